"""OpenTelemetry tracing of RPCs and the batches they ride in: off unless the OTEL_* environment turns it on.

Filled in by issue 16; until then every hook is a no-op.
"""

from __future__ import annotations


def start_call(call, metadata) -> None:
    """Start the RPC's span (continuing the caller's trace from `traceparent`), when tracing is on."""


def end_call(call, code: str) -> None:
    """End the RPC's span with its status code."""
