"""The one exception the client raises for a failed call."""

from __future__ import annotations

import grpc

from bitmoji.client.metadata import request_id_of


class BitmojiError(Exception):
    """A call to the server failed.

    `code` is the `grpc.StatusCode` (UNAVAILABLE or RESOURCE_EXHAUSTED after
    the retries ran out, INVALID_ARGUMENT for an input the server refused,
    ...), `details` the server's message, `method` the RPC, `request_id` the
    call's id (the server's `x-request-id` trailing metadata, else the
    `request_id=` the call was given, else None): quote it to whoever reads
    the server's logs. The original `grpc.RpcError` is the `__cause__`.
    Callers catch one type and branch on `code`, as they would on an HTTP
    status.
    """

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "", request_id: str | None = None):
        self.code = code
        self.details = details
        self.method = method
        self.request_id = request_id
        super().__init__(f"{code.name}: {details}")

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, method: str, request_id: str | None = None) -> BitmojiError:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(error), method, request_id_of(error, request_id))
