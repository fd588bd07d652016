"""What a call carries besides its request: a bearer token, a request id, the caller's trace context.

The trace context is OpenTelemetry's current one, injected with
`opentelemetry.propagate.inject` (W3C `traceparent`/`tracestate` with the
default propagators, or whatever OTEL_PROPAGATORS configures). A current span
can only exist once the caller has imported OpenTelemetry, so the client only
looks for it then: without OpenTelemetry, or in a program that never imported
it, nothing is imported and nothing is added.
"""

from __future__ import annotations

import sys

Metadata = tuple[tuple[str, str], ...]
REQUEST_ID = "x-request-id"  # the server reads it, logs it and sends it back in its trailing metadata


def bearer(token: str | None) -> Metadata:
    """`authorization: Bearer <token>`. Without TLS a token crosses the network in clear text."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def check_request_id(request_id: str | None) -> None:
    """gRPC metadata values are printable ASCII; say so before gRPC fails the call less clearly."""
    if request_id is None:
        return
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
    if not request_id or not (request_id.isascii() and request_id.isprintable()):
        raise ValueError(f"request_id must be non-empty printable ASCII, got {request_id!r}")


def trace_context() -> Metadata:
    """The current OpenTelemetry context as call metadata; empty without OpenTelemetry."""
    if "opentelemetry.context" not in sys.modules:  # never imported: no span can be current
        return ()
    try:
        from opentelemetry import propagate
    except ImportError:  # a partial install
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple((key.lower(), value) for key, value in carrier.items())


def call_metadata(auth: Metadata, request_id: str | None) -> Metadata:
    """One call's metadata: the token, the request id when given, the trace context when there is one."""
    check_request_id(request_id)
    request = ((REQUEST_ID, request_id),) if request_id else ()
    return auth + request + trace_context()


def request_id_of(error: object, sent: str | None = None) -> str | None:
    """The request id the server sent back in the failed call's trailing metadata, else the one we sent."""
    trailing = getattr(error, "trailing_metadata", None)
    try:
        pairs = trailing() if callable(trailing) else None
    except Exception:  # an error that never reached the server may have none to give
        pairs = None
    for key, value in pairs or ():
        if key == REQUEST_ID:
            return value.decode() if isinstance(value, bytes) else str(value)
    return sent
