"""Who may talk to the server: TLS credentials (optionally mutual) and bearer-token checks.

Tokens are checked by the server's interceptor (`bitmoji.server.interceptor`),
before any handler runs, so a refused call costs no decode and no queue place.
The rules:

- health (`grpc.health.v1.Health`) is always open: load balancers and
  Kubernetes probes cannot send tokens, and it reveals nothing;
- with `--auth-token`, every other call (Classifier, the Open Inference
  Protocol, ListModels, reflection) needs `authorization: Bearer <token>`;
  without it or with a wrong one, UNAUTHENTICATED;
- with `--probe-token`, GradientProbe (it reveals the model's internals)
  needs that token: a caller who has only the normal token gets
  PERMISSION_DENIED;
- the calls that change what is served (LoadModel, UnloadModel,
  SetDefaultVersion, SetTraffic, RepositoryModelLoad/Unload) need
  `--management-token` as soon as any token is set (PERMISSION_DENIED for the
  others; without a management token, management is off). With no token at
  all (a development server on loopback), everything is open.
The probe and management tokens are accepted wherever the normal one is.

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
# Loading, unloading and routing models: the bitmoji.v1 management service and the Open Inference
# Protocol's repository extension.
MANAGEMENT_PREFIXES = (
    "/bitmoji.v1.ModelRepository/LoadModel",
    "/bitmoji.v1.ModelRepository/UnloadModel",
    "/bitmoji.v1.ModelRepository/SetDefaultVersion",
    "/bitmoji.v1.ModelRepository/SetTraffic",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
)


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
    if config.tls_cert is None or config.tls_key is None:  # ServerConfig refuses one without the other
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


def tokens(config: ServerConfig) -> tuple[str | None, str | None, str | None]:
    """(auth token, probe token, management token) from the flags, environment or token files."""
    return (
        _token(config.auth_token, config.auth_token_file, "--auth-token"),
        _token(config.probe_token, config.probe_token_file, "--probe-token"),
        _token(config.management_token, config.management_token_file, "--management-token"),
    )


def describe(
    config: ServerConfig, auth_token: str | None, probe_token: str | None, management_token: str | None
) -> str:
    """For the ready line: what protects the port (never the secrets)."""
    parts = ["mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"]
    if auth_token:
        parts.append("token auth")
    if probe_token:
        parts.append("probe token")
    if management_token:
        parts.append("management token")
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


class TokenCheck:
    """Which bearer token each call needs (see the module's rules); `check` compares in constant time."""

    def __init__(self, auth_token: str | None, probe_token: str | None, management_token: str | None = None):
        if not (auth_token or probe_token or management_token):
            raise ValueError("TokenCheck needs a token")
        self._auth = auth_token
        self._probe = probe_token
        self._management = management_token

    def check(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message that refuse it."""
        if method.startswith(OPEN_PREFIXES):
            return None
        presented = _bearer(metadata)
        # Compare with every token, always: the time taken says nothing about which one matched.
        is_probe = _matches(presented, self._probe)
        is_auth = _matches(presented, self._auth)
        is_management = _matches(presented, self._management)
        if method.startswith(MANAGEMENT_PREFIXES):
            if is_management or (self._management is None and self._auth is None and self._probe is None):
                return None
            if self._management is None:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "model management is off: start the server with --management-token",
                )
            if is_auth or is_probe:
                return grpc.StatusCode.PERMISSION_DENIED, "model management needs the management token"
            return grpc.StatusCode.UNAUTHENTICATED, _missing(presented)
        if method == PROBE_METHOD and self._probe is not None:
            if is_probe:
                return None
            if is_auth or is_management:
                return grpc.StatusCode.PERMISSION_DENIED, "GradientProbe needs the probe token"
            return grpc.StatusCode.UNAUTHENTICATED, _missing(presented)
        if self._auth is None or is_auth or is_probe or is_management:
            return None
        return grpc.StatusCode.UNAUTHENTICATED, _missing(presented)


def _missing(presented: bytes | None) -> str:
    if presented is None:
        return "missing bearer token: send metadata 'authorization: Bearer <token>'"
    return "invalid bearer token"
