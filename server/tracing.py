"""OpenTelemetry tracing of RPCs and of the batches they ride in: off unless the OTEL_* environment turns it on.

On with the standard variables, through the OpenTelemetry SDK and its OTLP
exporter (the `tracing` extra):

    OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317 OTEL_SERVICE_NAME=bitmoji \\
    OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01 bitmoji-serve ...

(`console` prints spans to stdout; `none`, the default, or OTEL_SDK_DISABLED=true
leave tracing off, and then this module imports nothing of OpenTelemetry and
every hook below returns at its first line.)

What is recorded: one SERVER span per RPC (`bitmoji.v1.Classifier/Classify`),
continuing the caller's trace from its W3C `traceparent` metadata, with the
request id, model, version, item count and status code. A classified call's
span gets three children, recorded when its batch has run: `queue` (from its
arrival to its batch starting), `decode` (its items' decode and preprocess in
that batch) and `forward` (the batch's forward pass). One batch serves many
calls, so the batch has a span of its own (`batch`, with the batch size) that
links to the span of every call in it, and each call's `forward` links back to
it: the OpenTelemetry spec's links, for exactly this fan-in.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from bitmoji.server.calls import CURRENT_CALL, CallInfo

log = logging.getLogger("bitmoji-serve")

# grpc status codes the server side marks as errors (the OpenTelemetry semantic conventions for RPC servers):
# the others (INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's mistakes, not the server's.
SERVER_ERRORS = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
_EPOCH_NS = time.time_ns() - time.monotonic_ns()  # time.monotonic() -> the epoch nanoseconds spans use


def _ns(t: float) -> int:
    """A time.monotonic() value -> the epoch nanoseconds a span's start and end take."""
    return int(t * 1e9) + _EPOCH_NS


_tracer: Any = None  # set by configure(): None means tracing is off
_trace: Any = None  # the opentelemetry.trace module, once on
_propagator: Any = None


def enabled() -> bool:
    return _tracer is not None


def configure_from_environment() -> bool:
    """Turn tracing on if OTEL_TRACES_EXPORTER names an exporter; True when on. Raises ValueError for an
    exporter this server does not know, and ImportError (with the fix) when the `tracing` extra is missing."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    if not names or names == ["none"] or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    unknown = set(names) - {"otlp", "console"}
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER={','.join(names)}: this server exports to otlp, console or none")
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise ImportError(
            f"tracing needs the OpenTelemetry SDK: pip install 'bitmoji-serving[tracing]' ({exc})"
        ) from None
    # the sampler comes from OTEL_TRACES_SAMPLER(_ARG); OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over ours
    provider = TracerProvider(resource=Resource.create({"service.name": "bitmoji-serve"}))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    configure(provider)
    return True


def configure(provider) -> None:
    """Trace with `provider` (an SDK TracerProvider; tests pass one with an in-memory exporter)."""
    global _tracer, _trace, _propagator
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _trace, _propagator = trace, TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("bitmoji.server")


def shutdown(provider=None) -> None:
    """Flush and stop (at server stop); tracing is off afterwards."""
    global _tracer
    if _tracer is not None and provider is None:
        provider = _trace.get_tracer_provider() if _trace else None
    _tracer = None
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


# -- the hooks (each returns at once while tracing is off) ---------------------------------------------


def start_call(call: CallInfo, metadata) -> None:
    """Start the RPC's span, continuing the caller's trace (W3C traceparent), when tracing is on."""
    if _tracer is None:
        return
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    span = _tracer.start_span(
        f"{call.service}/{call.method}",
        context=_propagator.extract(carrier),
        kind=_trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": call.service, "rpc.method": call.method,
                    "bitmoji.request_id": call.request_id},
    )  # fmt: skip
    call.span = span
    context = span.get_span_context()
    if context.is_valid:
        call.trace_id = f"{context.trace_id:032x}"


def end_call(call: CallInfo, code: str) -> None:
    """End the RPC's span with what it served and its status code."""
    span = call.span
    if span is None or _tracer is None:
        return
    if call.model:
        span.set_attribute("bitmoji.model", call.model)
        span.set_attribute("bitmoji.model_version", call.version)
    span.set_attribute("rpc.grpc.status_code", code)
    if code in SERVER_ERRORS:
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, code))
    span.end()


def current_span():
    """The span of the call being handled (what a batch's spans hang under), or None."""
    if _tracer is None:
        return None
    call = CURRENT_CALL.get()
    return call.span if call is not None else None


def record_child(name: str, start: float, end: float, attributes: dict | None = None) -> None:
    """A child span of the current call's span, from `start` to `end` (time.monotonic() values)."""
    span = current_span()
    if span is None:
        return
    child = _tracer.start_span(
        name, context=_trace.set_span_in_context(span), start_time=_ns(start), attributes=attributes
    )
    child.end(end_time=_ns(end))


def record_batch(
    calls: list[tuple[Any, float, float, float, int]],
    *,
    batch_start: float,
    forward_start: float,
    forward_end: float,
    size: int,
    model: str,
    version: str,
) -> None:
    """On a model thread, after a forward pass: the batch's span and each traced call's queue/decode/forward.

    `calls`: (the call's RPC span, its arrival, its first decode start, its last decode end, its items in
    the batch); times are time.monotonic() values.
    """
    if _tracer is None or not calls:
        return
    first = _trace.set_span_in_context(calls[0][0])
    links = [_trace.Link(span.get_span_context()) for span, *_ in calls]
    batch = _tracer.start_span(
        "batch", context=first, links=links, start_time=_ns(batch_start),
        attributes={"bitmoji.batch_size": size, "bitmoji.model": model, "bitmoji.model_version": version},
    )  # fmt: skip
    batch.end(end_time=_ns(forward_end))
    back = [_trace.Link(batch.get_span_context())]
    for span, arrived, decode_start, decode_end, items in calls:
        parent = _trace.set_span_in_context(span)
        span.set_attribute("bitmoji.items", items)
        _tracer.start_span("queue", context=parent, start_time=_ns(arrived)).end(end_time=_ns(batch_start))
        _tracer.start_span("decode", context=parent, start_time=_ns(decode_start)).end(end_time=_ns(decode_end))
        forward = _tracer.start_span(
            "forward",
            context=parent,
            links=back,
            start_time=_ns(forward_start),
            attributes={"bitmoji.batch_size": size},
        )
        forward.end(end_time=_ns(forward_end))
