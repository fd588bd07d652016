"""The one place every RPC of every protocol passes: admission, request ids, auth, accounting, status codes.

A gRPC server interceptor (`CallInterceptor`) wraps each method handler:

- before the request is even read, a call may be refused: a wrong or missing
  bearer token (UNAUTHENTICATED / PERMISSION_DENIED, see `security`), the
  server still starting or already draining (UNAVAILABLE: retry, or go
  elsewhere), or `--max-concurrent-rpcs`
  calls already being handled (RESOURCE_EXHAUSTED: back off). A refused call
  costs no parsing, no queue place and no model time, and is counted;
- every call gets a request id (the caller's `x-request-id` metadata, or a new
  one), sent back in the trailing metadata and carried by the call's log lines;
- every call is counted and timed (`bitmoji_requests_total{method,code,model,version}`,
  `bitmoji_request_duration_seconds`) and, when tracing is on, gets a span;
- an `errors.EngineError` raised by a servicer becomes the gRPC status it
  names, with its message; anything else is INTERNAL, logged with its traceback.

Health (`grpc.health.v1`) passes untouched: load balancers must always get an
answer. Reflection is authenticated but not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from bitmoji.core.gradients import ProbeError
from bitmoji.server import tracing
from bitmoji.server.calls import CURRENT_CALL, CallInfo
from bitmoji.server.errors import EngineError
from bitmoji.server.metrics import REFUSED_CONCURRENCY, REFUSED_SHUTDOWN, REFUSED_STARTING, Metrics
from bitmoji.server.security import TokenCheck

log = logging.getLogger("bitmoji-serve")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
REQUEST_ID = "x-request-id"
MAX_REQUEST_ID = 128
DEADLINE_SLACK_S = 0.05  # a cancel this close to the call's deadline is counted as the deadline (see _cancel_code)


PHASE_STARTING, PHASE_SERVING, PHASE_DRAINING = "starting", "serving", "draining"
# What a starting server answers (readiness says "not yet"); everything else waits for warm-up to end.
ANSWERED_WHILE_STARTING = ("/inference.GRPCInferenceService/Server", "/inference.GRPCInferenceService/ModelReady")


class CallTracker:
    """Calls being handled now: what `--max-concurrent-rpcs` bounds and what a graceful shutdown waits for.

    `phase` is the server's: while starting and while draining, new calls get UNAVAILABLE (retry, or go to
    another server), so a call never meets a server with no model loaded yet or one closing its port.
    """

    def __init__(self, max_concurrent: int):
        self.max_concurrent = max_concurrent
        self.active = 0
        self.phase = PHASE_STARTING

    async def drained(self, timeout: float, settle: float = 0.05) -> bool:
        """Wait until no call is being handled (and none started within `settle`), at most `timeout`; True if so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.active:
                await asyncio.sleep(settle)  # a call admitted just before refusing began may not have started yet
                if not self.active:
                    return True
            await asyncio.sleep(0.01)
        return not self.active


def request_id(metadata) -> str:
    """The caller's x-request-id when it is a sane token, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            if 0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable() and " " not in value:
                return value
            break
    return uuid.uuid4().hex


def _cancel_code(context) -> grpc.StatusCode:
    # The client's deadline timer fires a little before the server's copy of it (which started when the call
    # arrived: 4 ms later on a busy box), so the client's cancel comes first: that close to the deadline, it is one.
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _status(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, EngineError):
        return grpc.StatusCode[exc.status], str(exc)
    if isinstance(exc, ProbeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log.exception("%s: unexpected error", method)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}"


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, tracker: CallTracker, tokens: TokenCheck | None = None):
        self._metrics = metrics
        self._tracker = tracker
        self._tokens = tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        path = details.method
        if handler is None or path.startswith(HEALTH_PREFIX):
            return handler  # unknown methods are UNIMPLEMENTED either way; health is always open
        metadata = details.invocation_metadata
        service, _, method = path[1:].rpartition("/")
        refusal = self._tokens.check(path, metadata) if self._tokens is not None else None
        if path.startswith(REFLECTION_PREFIX):
            return handler if refusal is None else _refusing(handler, *refusal, "")
        tracker = self._tracker
        reason = None
        if refusal is None and tracker.phase == PHASE_DRAINING:
            reason = REFUSED_SHUTDOWN
            refusal = grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry on another server"
        elif refusal is None and tracker.phase == PHASE_STARTING and not path.startswith(ANSWERED_WHILE_STARTING):
            reason = REFUSED_STARTING
            refusal = grpc.StatusCode.UNAVAILABLE, "the server is starting (loading its models): retry shortly"
        elif refusal is None and tracker.active >= tracker.max_concurrent:
            reason = REFUSED_CONCURRENCY
            refusal = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is handling {tracker.active} calls (--max-concurrent-rpcs {tracker.max_concurrent}): "
                "retry later",
            )
        rid = request_id(metadata)
        if refusal is not None:
            code, message = refusal
            if reason is not None:
                self._metrics.refusals.labels(reason).inc()
            self._metrics.requests.labels(method, code.name, "", "").inc()
            log.debug("%s refused: %s (%s) [request %s]", method, code.name, message, rid)
            return _refusing(handler, code, message, rid)
        if handler.request_streaming and handler.response_streaming:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, service, method, rid, metadata))
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, service, method, rid, metadata))
        return handler  # no other kind is served (server streaming, client streaming)

    @contextlib.asynccontextmanager
    async def _handling(self, service: str, method: str, rid: str, metadata, context):
        """Around one call's handler: in flight, request id, span; its outcome counted, timed and made a status."""
        call = CallInfo(method, rid, service)
        token = CURRENT_CALL.set(call)
        tracing.start_call(call, metadata)
        self._tracker.active += 1
        metrics = self._metrics
        metrics.inflight.inc()
        context.set_trailing_metadata(((REQUEST_ID, rid),))
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except asyncio.CancelledError:
            code = _cancel_code(context)
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            code, message = _status(exc, method)
            await context.abort(code, message)
        finally:
            self._tracker.active -= 1
            metrics.inflight.dec()
            metrics.requests.labels(method, code.name, call.model, call.version).inc()
            metrics.request_duration.labels(method, call.model, call.version).observe(time.perf_counter() - start)
            tracing.end_call(call, code.name)
            CURRENT_CALL.reset(token)

    def _unary(self, behavior, service: str, method: str, rid: str, metadata):
        async def unary(request, context):
            async with self._handling(service, method, rid, metadata, context):
                return await behavior(request, context)

        return unary

    def _stream(self, behavior, service: str, method: str, rid: str, metadata):
        async def stream(request_iterator, context):
            async with self._handling(service, method, rid, metadata, context):
                async for response in behavior(request_iterator, context):
                    yield response

        return stream


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, rid: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `code` and parses nothing."""
    trailing = ((REQUEST_ID, rid),) if rid else ()

    async def unary(request, context):
        await context.abort(code, message, trailing)

    async def streaming(request, context):
        await context.abort(code, message, trailing)
        yield  # pragma: no cover (makes this an async generator)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)
