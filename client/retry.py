"""The channel's retry policy and retry budget, as a gRPC service config: gRPC itself retries, not our code.

`bitmoji.client`'s docstring says what callers get; this is how. Measured in
grpcio 1.85 (tests/test_client_retry.py): the policy's backoff is
`initialBackoff * backoffMultiplier**n`, capped at `maxBackoff`, with +-20%
jitter (gRPC core's own; the gRFC's random(0, x) is not what it does);
`maxAttempts` over 5 is clamped to 5 with an error line on stderr, hence
MAX_RETRIES. gRPC keeps each call's request (up to
`grpc.per_rpc_retry_buffer_size`, 256 KiB by default, which `channel.py`
raises to the message limit) until the call commits, when the server's
response headers or first message arrive: a bigger request would commit the
call at once and never be retried. The throttle's tokens belong to the
channel (one client), not to the process.
"""

from __future__ import annotations

from typing import Any

# UNAVAILABLE: no connection, or a server draining; RESOURCE_EXHAUSTED: its queue is full; CANCELLED: a stopping
# server cancels the calls gRPC had read but not handed to a handler yet (measured: round robin over two servers
# loses calls when one stops, unless CANCELLED is retried). A caller's own cancellation is never retried.
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED")
# Every RPC of these is idempotent, the management calls included (loading a loaded version changes nothing).
SERVICES = ("bitmoji.v1.Classifier", "bitmoji.v1.ModelRepository", "grpc.health.v1.Health")
MAX_RETRIES = 4  # gRPC makes at most 5 attempts per call
BACKOFF_MULTIPLIER = 2
# The retry budget (gRPC's retryThrottling): a failure with a retryable code costs a token, a success earns
# TOKEN_RATIO of one; no retry while a channel holds MAX_TOKENS / 2 tokens or fewer. A fresh channel retries
# its first 4 such failures, not the 5th; retries resume after about 10 successes per token lost. Over any run,
# retries <= 5 + successes / 10, however many calls fail: a channel whose calls keep failing sends one attempt
# per call.
MAX_TOKENS = 10
TOKEN_RATIO = 0.1
MIN_BACKOFF = 0.001  # gRPC refuses a zero backoff; backoff=0 waits this long


def check_retries(retries: int, backoff: float) -> None:
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be 0 to {MAX_RETRIES} (gRPC makes at most 5 attempts a call), got {retries}")
    if backoff < 0:
        raise ValueError(f"backoff must be >= 0, got {backoff}")


def _seconds(value: float) -> str:
    """A protobuf JSON Duration: "0.100s"."""
    return f"{value:.3f}s"


def method_config(retries: int, backoff: float) -> dict[str, Any]:
    """Our services' methods: retried `retries` times on RETRYABLE_CODES, waiting backoff, 2x backoff, 4x..."""
    config: dict[str, Any] = {"name": [{"service": service} for service in SERVICES]}
    if retries > 0:  # maxAttempts must be at least 2: no retryPolicy at all means no retries
        backoff = max(backoff, MIN_BACKOFF)
        config["retryPolicy"] = {
            "maxAttempts": retries + 1,
            "initialBackoff": _seconds(backoff),
            # the last wait uncapped: backoff * 2**(retries - 1), as the client always waited
            "maxBackoff": _seconds(backoff * BACKOFF_MULTIPLIER ** (retries - 1)),
            "backoffMultiplier": BACKOFF_MULTIPLIER,
            "retryableStatusCodes": list(RETRYABLE_CODES),
        }
    return config


def service_config(*, retries: int, backoff: float, load_balancing: str | None) -> dict[str, Any]:
    """The whole service config for `grpc.service_config`: load balancing, retry policy, retry budget."""
    check_retries(retries, backoff)
    config: dict[str, Any] = {
        "methodConfig": [method_config(retries, backoff)],
        "retryThrottling": {"maxTokens": MAX_TOKENS, "tokenRatio": TOKEN_RATIO},
    }
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    return config
