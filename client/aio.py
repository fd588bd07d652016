"""The asyncio client: `BitmojiClient`'s methods as coroutines, over a `grpc.aio` channel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitmoji.client import base, channel, convert, results, tensors
from bitmoji.client.base import HEALTH_POLL_SECONDS, STILL_STARTING, Version, health_status_name
from bitmoji.client.errors import BitmojiError
from bitmoji.client.results import ModelInfo, ModelList, ModelStatus, Prediction, ProbeResult
from bitmoji.client.tensors import TensorType
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc

Response = TypeVar("Response")


class AsyncBitmojiClient(base.ClientSettings):
    """`BitmojiClient` for asyncio code: the same arguments, methods, retries and errors, awaited.

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
        management_token: str | None = None,
        model: str | None = None,
        version: Version | None = None,
        load_balancing: str | None = None,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
    ):
        super().__init__(
            target,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_message_bytes=max_message_bytes,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            token=token,
            management_token=management_token,
            model=model,
            version=version,
            load_balancing=load_balancing,
            wait_for_ready=wait_for_ready,
            options=options,
        )
        chosen = list(interceptors) or None
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._options, interceptors=chosen)
        else:
            self._channel = grpc.aio.secure_channel(
                target, self._credentials, options=self._options, interceptors=chosen
            )
        self._stub = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._repository = classifier_pb2_grpc.ModelRepositoryStub(self._channel)
        # Any: types-grpcio-health-checking's HealthStub declares no methods
        self._health: Any = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncBitmojiClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self,
        name: str,
        rpc: Callable[..., Awaitable[Response]],
        request: Any,
        timeout: float | None,
        request_id: str | None,
        *,
        management: bool = False,
        wait: bool | None = None,
    ) -> Response:
        call_metadata = self._metadata(request_id, management=management)
        try:
            return await rpc(
                request,
                timeout=self._deadline(timeout),
                metadata=call_metadata,
                wait_for_ready=self._wait() if wait is None else wait,
            )
        except grpc.RpcError as error:
            raise BitmojiError.from_rpc_error(error, name, request_id) from error

    # -- Classifier ----------------------------------------------------------------------------

    async def classify(
        self,
        items: Any,
        *,
        model: str | None = None,
        version: Version | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> list[Prediction]:
        """See `BitmojiClient.classify`. Files are read before the call, in this thread."""
        request = convert.classify_request(items, *self._route(model, version))
        if not request.inputs:
            return []
        response = await self._call("Classify", self._stub.Classify, request, timeout, request_id)
        return results.predictions_from(response)

    async def classify_stream(
        self,
        batches: Iterable[Any] | AsyncIterable[Any],
        *,
        model: str | None = None,
        version: Version | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[list[Prediction]]:
        """See `BitmojiClient.classify_stream`; `batches` may also be an async iterable."""
        failure: list[Exception] = []
        call = self._stub.StreamClassify(
            convert.astream_requests(batches, failure, *self._route(model, version)),
            timeout=self._deadline(timeout),
            metadata=self._metadata(request_id),
            wait_for_ready=self._wait(),
        )
        try:
            async for response in call:
                yield results.predictions_from(response)
        except grpc.RpcError as error:
            raise failure[0] if failure else BitmojiError.from_rpc_error(error, "StreamClassify", request_id) from error
        finally:
            call.cancel()
        if failure:
            raise failure[0]

    async def gradient_probe(
        self,
        inputs: Any,
        targets: Any,
        loss: str = "bce",
        *,
        values: bool = False,
        saliency: bool = False,
        tensor_type: TensorType = "auto",
        model: str | None = None,
        version: Version | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ProbeResult:
        """See `BitmojiClient.gradient_probe`."""
        tensors.resolve(tensor_type)
        request = convert.probe_request(inputs, targets, loss, values, saliency, *self._route(model, version))
        response = await self._call("GradientProbe", self._stub.GradientProbe, request, timeout, request_id)
        return results.probe_result_from(response, tensor_type)

    async def model_info(
        self,
        *,
        model: str | None = None,
        version: Version | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ModelInfo:
        """See `BitmojiClient.model_info`."""
        request = base.model_info_request(*self._route(model, version))
        response = await self._call("GetModelInfo", self._stub.GetModelInfo, request, timeout, request_id)
        return results.model_info_from(response)

    # -- ModelRepository -----------------------------------------------------------------------

    async def _manage(
        self, name: str, rpc: Callable[..., Awaitable[Any]], request: Any, timeout: float | None, request_id: str | None
    ) -> Any:
        return await self._call(name, rpc, request, timeout, request_id, management=True)

    async def list_models(
        self, ready_only: bool = False, *, timeout: float | None = None, request_id: str | None = None
    ) -> ModelList:
        """See `BitmojiClient.list_models`."""
        request = pb.ListModelsRequest(ready_only=ready_only)
        response = await self._manage("ListModels", self._repository.ListModels, request, timeout, request_id)
        return results.model_list_from(response)

    async def load_model(
        self,
        name: str,
        versions: Sequence[Version] = (),
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ModelStatus:
        """See `BitmojiClient.load_model`."""
        request = base.load_request(name, versions)
        response = await self._manage("LoadModel", self._repository.LoadModel, request, timeout, request_id)
        return results.model_status_from(response.model)

    async def unload_model(
        self,
        name: str,
        versions: Sequence[Version] = (),
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ModelStatus:
        """See `BitmojiClient.unload_model`."""
        request = base.unload_request(name, versions)
        response = await self._manage("UnloadModel", self._repository.UnloadModel, request, timeout, request_id)
        return results.model_status_from(response.model)

    async def set_default_version(
        self, name: str, version: Version | None, *, timeout: float | None = None, request_id: str | None = None
    ) -> ModelStatus:
        """See `BitmojiClient.set_default_version`."""
        request = base.default_version_request(name, version)
        rpc = self._repository.SetDefaultVersion
        return results.model_status_from(
            (await self._manage("SetDefaultVersion", rpc, request, timeout, request_id)).model
        )

    async def set_traffic(
        self,
        name: str,
        canary_version: Version | None = "",
        canary_weight: float = 0.0,
        shadow_version: Version | None = "",
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ModelStatus:
        """See `BitmojiClient.set_traffic`."""
        request = base.traffic_request(name, canary_version, canary_weight, shadow_version)
        response = await self._manage("SetTraffic", self._repository.SetTraffic, request, timeout, request_id)
        return results.model_status_from(response.model)

    # -- Health --------------------------------------------------------------------------------

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """See `BitmojiClient.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._call("Check", self._health.Check, request, timeout, None, wait=False)
        except BitmojiError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return health_status_name(response.status)

    async def wait_until_serving(self, timeout: float | None = None, service: str = "") -> None:
        """See `BitmojiClient.wait_until_serving`."""
        timeout = self._deadline(timeout)
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=service)
        last = "no answer"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                response = await self._health.Check(
                    request, timeout=remaining, wait_for_ready=True, metadata=self._auth
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
