"""What a channel to the server is made of: options (with the retry policy), credentials.

Shared by the blocking and the asyncio client, which differ only in the
channel class they build from these.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

from bitmoji.client import retry

DEFAULT_TARGET = "127.0.0.1:50051"
# The server's default too: a client that can send what the server accepts, and read what it sends.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")
# gRPC waits up to 120 s between reconnects by default; a restarted server should be found within seconds.
MAX_RECONNECT_BACKOFF_MS = 5_000


def channel_options(
    *,
    max_message_bytes: int,
    load_balancing: str | None,
    retries: int,
    backoff: float,
    options: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """gRPC channel arguments; `options` given by the caller win over ours (a `grpc.service_config`
    of theirs replaces our retry policy and load balancing whole)."""
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    if load_balancing is not None and load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"load_balancing must be one of {LOAD_BALANCING_POLICIES}, got {load_balancing!r}")
    # round_robin spreads calls over every address the target resolves to: a `dns:///name:port` target of a
    # headless Kubernetes Service, or a list such as `ipv4:10.0.0.1:50051,10.0.0.2:50051`.
    config = retry.service_config(retries=retries, backoff=backoff, load_balancing=load_balancing)
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.service_config": json.dumps(config),
        "grpc.enable_retries": 1,  # gRPC's default; said here because the client relies on it
        # gRPC keeps a request for retries only up to this size (256 KiB by default, less than a few images).
        "grpc.per_rpc_retry_buffer_size": max_message_bytes,
        # Reconnect about as fast as we retry, so a retry after a restart finds the server.
        "grpc.initial_reconnect_backoff_ms": max(int(backoff * 1000), 100),
        "grpc.max_reconnect_backoff_ms": MAX_RECONNECT_BACKOFF_MS,
    }
    merged.update(dict(options))
    return list(merged.items())


def channel_credentials(
    *,
    tls: bool,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials (mutual TLS with a key and chain), or None for a plaintext channel."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mutual TLS needs both private_key and certificate_chain")
    if not (tls or root_certificates or private_key):
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def check_call_settings(timeout: float, retries: int, backoff: float) -> None:
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    retry.check_retries(retries, backoff)
