"""What the blocking and the asyncio client share: checked settings, the channel's parts, each call's
model, version, deadline and metadata, and the management requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from bitmoji.client import channel, metadata
from bitmoji.v1 import classifier_pb2 as pb

Version = str | int


def _name(value: Version | None, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return str(value)


def _versions(versions: Sequence[Version]) -> list[str]:
    if isinstance(versions, (str, int)):  # one version: a string is a sequence too, of its characters
        versions = [versions]
    return [str(_name(v, "a version")) for v in versions]


class ClientSettings:
    """The constructor's arguments, checked once; see `BitmojiClient` for their meaning."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        retries: int,
        backoff: float,
        max_message_bytes: int,
        tls: bool,
        root_certificates: bytes | None,
        private_key: bytes | None,
        certificate_chain: bytes | None,
        token: str | None,
        management_token: str | None,
        model: str | None,
        version: Version | None,
        load_balancing: str | None,
        wait_for_ready: bool,
        options: Sequence[tuple[str, Any]],
    ):
        channel.check_call_settings(timeout, retries, backoff)
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.model = _name(model, "model") or ""
        self.version = _name(version, "version") or ""
        self.wait_for_ready = wait_for_ready
        self._options = channel.channel_options(
            max_message_bytes=max_message_bytes,
            load_balancing=load_balancing,
            retries=retries,
            backoff=backoff,
            options=options,
        )
        self._credentials = channel.channel_credentials(
            tls=tls, root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
        )
        self._auth = metadata.bearer(token)
        self._management_auth = metadata.bearer(management_token or token)

    def __repr__(self) -> str:
        named = "".join(f", {k}={v!r}" for k, v in (("model", self.model), ("version", self.version)) if v)
        return f"{type(self).__name__}({self.target!r}{named}, timeout={self.timeout}, retries={self.retries})"

    def _deadline(self, timeout: float | None) -> float:
        if timeout is None:
            return self.timeout
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        return timeout

    def _route(self, model: str | None, version: Version | None) -> tuple[str, str]:
        """(model, version) for one call: the call's, else the client's. A call naming another model
        than the client's gets that model's default version unless it names one."""
        call_model, call_version = _name(model, "model"), _name(version, "version")
        name = self.model if call_model is None else call_model
        if call_version is not None:
            return name, call_version
        return name, self.version if name == self.model else ""

    def _metadata(self, request_id: str | None, *, management: bool = False) -> metadata.Metadata:
        return metadata.call_metadata(self._management_auth if management else self._auth, request_id)

    def _wait(self) -> bool | None:
        return True if self.wait_for_ready else None  # None: gRPC's default, fail fast


def model_info_request(model: str, version: str) -> pb.GetModelInfoRequest:
    return pb.GetModelInfoRequest(model_name=model, model_version=version)


def load_request(name: str, versions: Sequence[Version]) -> pb.LoadModelRequest:
    return pb.LoadModelRequest(model_name=_model_name(name), versions=_versions(versions))


def unload_request(name: str, versions: Sequence[Version]) -> pb.UnloadModelRequest:
    return pb.UnloadModelRequest(model_name=_model_name(name), versions=_versions(versions))


def default_version_request(name: str, version: Version | None) -> pb.SetDefaultVersionRequest:
    return pb.SetDefaultVersionRequest(model_name=_model_name(name), version=_name(version, "version") or "")


def traffic_request(
    name: str, canary_version: Version | None, canary_weight: float, shadow_version: Version | None
) -> pb.SetTrafficRequest:
    canary = _name(canary_version, "canary_version") or ""
    if not 0.0 <= canary_weight <= 1.0:
        raise ValueError(f"canary_weight must be in [0, 1], got {canary_weight}")
    if canary_weight > 0 and not canary:
        raise ValueError("a canary_weight needs a canary_version")
    return pb.SetTrafficRequest(
        model_name=_model_name(name),
        canary_version=canary,
        canary_weight=canary_weight,
        shadow_version=_name(shadow_version, "shadow_version") or "",
    )


def _model_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name is needed, got {name!r}")
    return name


HEALTH_POLL_SECONDS = 0.1
# While a server starts: not reachable yet, or its health service does not know the name yet.
STILL_STARTING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND)


def health_status_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
