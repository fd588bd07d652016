"""What is known about the RPC being handled, in a context variable: request id, trace id, model version.

Set by the interceptor when a call starts, completed by the engine when it
picks the model version; log lines (`bitmoji.server.logs`), metrics and spans
about the call read it. Import-light: the `--workers` supervisor's logging uses it.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any


@dataclass
class CallInfo:
    method: str  # Classify, ModelInfer, ...
    request_id: str
    service: str = ""  # bitmoji.v1.Classifier, inference.GRPCInferenceService, ...
    model: str = ""
    version: str = ""
    trace_id: str = ""
    span: Any = None  # the RPC's OpenTelemetry span, when tracing is on


CURRENT_CALL: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("bitmoji_call", default=None)
