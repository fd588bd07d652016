"""The engine's failures, each named by the status a caller gets, whatever the protocol.

The engine (and the batcher, the model manager, the inputs) raise these; the
gRPC layer turns `status` into a `grpc.StatusCode` of the same name, once, in
`bitmoji.server.interceptor`. The message is the caller's: it says what was
wrong and never carries a payload. Anything else that escapes is INTERNAL and
logged.
"""

from __future__ import annotations


class EngineError(Exception):
    """A call the engine cannot serve; `status` names the gRPC status code, the message says why."""

    status = "INTERNAL"


class InvalidArgument(EngineError, ValueError):
    status = "INVALID_ARGUMENT"


class NotFound(EngineError):
    """An unknown model or version, or one not loaded: the message names what is available."""

    status = "NOT_FOUND"


class ResourceExhausted(EngineError):
    """Too much work now (the queue, concurrent calls, loaded models): retry later, with backoff."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(EngineError):
    """The server (or the model version) is shutting down or unloading: safe to retry, elsewhere."""

    status = "UNAVAILABLE"


class DeadlineExceeded(EngineError):
    status = "DEADLINE_EXCEEDED"


class FailedPrecondition(EngineError):
    """The server's state does not allow the call (e.g. loading a model in --model-control-mode none)."""

    status = "FAILED_PRECONDITION"


class Unimplemented(EngineError):
    status = "UNIMPLEMENTED"


class Internal(EngineError):
    """The model failed (its forward raised, its output has the wrong shape): the message says how."""

    status = "INTERNAL"
