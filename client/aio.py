"""The asyncio client: `BitmojiClient`'s methods as coroutines, over a `grpc.aio` channel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitmoji.client import channel, convert, results
from bitmoji.client.client import HEALTH_POLL_SECONDS, STILL_STARTING, health_status_name
from bitmoji.client.errors import BitmojiError
from bitmoji.client.results import ModelInfo, Prediction, ProbeResult
from bitmoji.client.retry import acall_with_retries
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc


class AsyncBitmojiClient:
    """`BitmojiClient` for asyncio code: the same arguments, methods and errors, awaited.

    Create it inside the event loop that uses it (grpc.aio channels belong to
    one loop) and close it with `await client.close()` or `async with`.
    `interceptors` are `grpc.aio` client interceptors.
    """

    def __init__(
        self,
        target: str = channel.DEFAULT_TARGET,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        max_message_bytes: int = channel.DEFAULT_MAX_MESSAGE_BYTES,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        token: str | None = None,
        load_balancing: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
    ):
        channel.check_call_settings(timeout, retries, backoff)
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        options = channel.channel_options(
            max_message_bytes=max_message_bytes, load_balancing=load_balancing, backoff=backoff, options=options
        )
        credentials = channel.channel_credentials(
            tls=tls, root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
        )
        interceptors = list(interceptors) or None
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
        self._stub = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = channel.call_metadata(token)

    def __repr__(self) -> str:
        return f"AsyncBitmojiClient({self.target!r}, timeout={self.timeout}, retries={self.retries})"

    async def __aenter__(self) -> AsyncBitmojiClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, name: str, rpc, request, timeout: float | None):
        return await acall_with_retries(
            lambda remaining: rpc(request, timeout=remaining, metadata=self._metadata),
            method=name,
            timeout=self.timeout if timeout is None else timeout,
            retries=self.retries,
            backoff=self.backoff,
        )

    async def classify(self, items, *, timeout: float | None = None) -> list[Prediction]:
        """See `BitmojiClient.classify`. Files are read before the call, in this thread."""
        request = convert.classify_request(items)
        if not request.inputs:
            return []
        return results.predictions_from(await self._call("Classify", self._stub.Classify, request, timeout))

    async def classify_stream(self, batches, *, timeout: float | None = None) -> AsyncIterator[list[Prediction]]:
        """See `BitmojiClient.classify_stream`; `batches` may also be an async iterable."""
        failure: list[Exception] = []
        call = self._stub.StreamClassify(
            convert.astream_requests(batches, failure),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )
        try:
            async for response in call:
                yield results.predictions_from(response)
        except grpc.RpcError as error:
            raise failure[0] if failure else BitmojiError.from_rpc_error(error, "StreamClassify") from error
        finally:
            call.cancel()
        if failure:
            raise failure[0]

    async def gradient_probe(
        self,
        inputs,
        targets,
        loss: str = "bce",
        *,
        values: bool = False,
        saliency: bool = False,
        timeout: float | None = None,
    ) -> ProbeResult:
        """See `BitmojiClient.gradient_probe`."""
        request = convert.probe_request(inputs, targets, loss, values, saliency)
        return results.probe_result_from(await self._call("GradientProbe", self._stub.GradientProbe, request, timeout))

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        response = await self._call("GetModelInfo", self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return results.model_info_from(response)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """See `BitmojiClient.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._call("Check", self._health.Check, request, timeout)
        except BitmojiError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return health_status_name(response.status)

    async def wait_until_serving(self, timeout: float | None = None, service: str = "") -> None:
        """See `BitmojiClient.wait_until_serving`."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=service)
        last = "no answer"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                response = await self._health.Check(
                    request, timeout=remaining, wait_for_ready=True, metadata=self._metadata
                )
                last = health_status_name(response.status)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                if error.code() not in STILL_STARTING:
                    raise BitmojiError.from_rpc_error(error, "Check") from error
                last = error.code().name
            await asyncio.sleep(min(HEALTH_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
        raise BitmojiError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.target} not SERVING after {timeout:g} s (last: {last})", "Check"
        )
