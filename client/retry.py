"""Retry on UNAVAILABLE with exponential backoff, inside one deadline.

UNAVAILABLE means the call never reached a model (no connection, server
draining), so trying again is safe; every other status is the server's answer
and is returned as it is. The deadline covers all attempts and the waits
between them: `timeout` is what the caller waits at most.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from bitmoji.client.errors import BitmojiError

T = TypeVar("T")
JITTER = 0.2  # +-20%, as gRPC's own reconnect backoff: clients that failed together do not retry together


def backoff_delay(attempt: int, base: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry): base * 2**attempt, jittered."""
    return base * 2**attempt * (1 - JITTER + 2 * JITTER * rng())


def _give_up(error: grpc.RpcError, attempt: int, retries: int, wake: float, deadline: float) -> bool:
    code = error.code() if hasattr(error, "code") else None
    return code != grpc.StatusCode.UNAVAILABLE or attempt >= retries or wake >= deadline


def call_with_retries(
    call: Callable[[float], T],
    *,
    method: str,
    timeout: float,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`call(remaining_seconds)` until it succeeds, fails with a status other than UNAVAILABLE,
    or the retries or the deadline run out; failures are raised as BitmojiError."""
    deadline = clock() + timeout
    attempt = 0
    while True:
        try:
            return call(max(deadline - clock(), 0.0))
        except grpc.RpcError as error:
            delay = backoff_delay(attempt, backoff)
            if _give_up(error, attempt, retries, clock() + delay, deadline):
                raise BitmojiError.from_rpc_error(error, method) from error
        sleep(delay)
        attempt += 1


async def acall_with_retries(
    call: Callable[[float], Awaitable[T]],
    *,
    method: str,
    timeout: float,
    retries: int,
    backoff: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """The asyncio twin of `call_with_retries`."""
    deadline = clock() + timeout
    attempt = 0
    while True:
        try:
            return await call(max(deadline - clock(), 0.0))
        except grpc.RpcError as error:
            delay = backoff_delay(attempt, backoff)
            if _give_up(error, attempt, retries, clock() + delay, deadline):
                raise BitmojiError.from_rpc_error(error, method) from error
        await sleep(delay)
        attempt += 1
