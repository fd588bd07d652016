"""Who may talk to the server: TLS credentials (optionally mutual) and bearer-token checks.

Tokens are checked by a gRPC server interceptor, before any handler runs, so a
refused call costs no decode and no queue place. The rules:

- health (`grpc.health.v1.Health`) is always open: load balancers and
  Kubernetes probes cannot send tokens, and it reveals nothing;
- with `--auth-token`, every other call (Classifier and reflection) needs
  `authorization: Bearer <token>`; without it or with a wrong one,
  UNAUTHENTICATED;
- with `--probe-token`, GradientProbe (it reveals the model's internals)
  needs that token: a caller who has only the normal token gets
  PERMISSION_DENIED. The probe token is accepted wherever the normal one is.

Tokens are compared with `hmac.compare_digest` (constant time) and never
logged; a token crosses the network in clear text unless TLS is on.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

from bitmoji.server.config import ServerConfig, check_token

log = logging.getLogger("bitmoji-serve")

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
PROBE_METHOD = "/bitmoji.v1.Classifier/GradientProbe"


class SecurityConfigError(RuntimeError):
    """A certificate, key or token file the server cannot use; the message says which."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {path}: the file is empty")
    return data


def _pem(path: str, what: str) -> bytes:
    data = _read(path, what)
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{what} {path}: not a PEM file")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca for mutual TLS), or None for plaintext."""
    if config.tls_cert is None:
        return None
    pair = (_pem(config.tls_key, "--tls-key"), _pem(config.tls_cert, "--tls-cert"))
    client_ca = _pem(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _token(value: str | None, path: str | None, flag: str) -> str | None:
    if path is not None:
        try:
            return check_token(_read(path, f"{flag}-file").decode("ascii", "replace").strip(), f"{flag}-file {path}")
        except ValueError as exc:
            raise SecurityConfigError(str(exc)) from None
    return value


def tokens(config: ServerConfig) -> tuple[str | None, str | None]:
    """(auth token, probe token) from the flags, environment or token files."""
    return _token(config.auth_token, config.auth_token_file, "--auth-token"), _token(
        config.probe_token, config.probe_token_file, "--probe-token"
    )


def describe(config: ServerConfig, auth_token: str | None, probe_token: str | None) -> str:
    """For the ready line: what protects the port (never the secrets)."""
    parts = ["mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"]
    if auth_token:
        parts.append("token auth")
    if probe_token:
        parts.append("probe token")
    return ", ".join(parts)


def _bearer(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip().encode("utf-8", "replace")
            return None
    return None


def _matches(presented: bytes | None, token: str | None) -> bool:
    if presented is None or token is None:
        return False
    return hmac.compare_digest(presented, token.encode("ascii"))


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `code` and reads nothing."""

    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover (makes this an async generator)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call but health's (see the module's rules)."""

    def __init__(self, auth_token: str | None, probe_token: str | None, metrics=None):
        if not (auth_token or probe_token):
            raise ValueError("TokenAuthInterceptor needs a token")
        self._auth = auth_token
        self._probe = probe_token
        self._metrics = metrics

    def check(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message that refuse it."""
        if method.startswith(OPEN_PREFIXES):
            return None
        presented = _bearer(metadata)
        # Compare with every token, always: the time taken says nothing about which one matched.
        is_probe = _matches(presented, self._probe)
        is_auth = _matches(presented, self._auth)
        if method == PROBE_METHOD and self._probe is not None:
            if is_probe:
                return None
            if is_auth:
                return grpc.StatusCode.PERMISSION_DENIED, "GradientProbe needs the probe token"
            return grpc.StatusCode.UNAUTHENTICATED, _missing(presented)
        if self._auth is None or is_auth or is_probe:
            return None
        return grpc.StatusCode.UNAUTHENTICATED, _missing(presented)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: UNIMPLEMENTED either way
        method = handler_call_details.method
        refusal = self.check(method, handler_call_details.invocation_metadata)
        if refusal is None:
            return handler
        code, message = refusal
        log.debug("%s refused: %s (%s)", method, code.name, message)
        if self._metrics is not None:
            self._metrics.requests.labels(method.rsplit("/", 1)[-1], code.name).inc()
        return _denied(handler, code, message)


def _missing(presented: bytes | None) -> str:
    if presented is None:
        return "missing bearer token: send metadata 'authorization: Bearer <token>'"
    return "invalid bearer token"
