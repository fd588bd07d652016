"""The blocking client: one channel, one method per RPC, a deadline on every call (gRPC retries within it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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


class BitmojiClient(base.ClientSettings):
    """A connection to a bitmoji server: its `Classifier` and `ModelRepository` services.

    Make one and share it (it is thread-safe; a channel is costly to set up),
    close it with `close()` or a `with` block. Every call has a deadline
    (`timeout` seconds, its retries included); UNAVAILABLE and
    RESOURCE_EXHAUSTED are retried by gRPC up to `retries` times (0 to 4)
    after `backoff`, 2x, 4x... seconds, within a retry budget (see
    `bitmoji.client`'s docstring for the exact rules). A failed call raises
    `BitmojiError` (with the gRPC `code`, `details` and `request_id`). Bad
    arguments raise TypeError/ValueError before anything is sent; an
    unreadable file raises OSError.

    `model` and `version` name what calls run on ("" or None: the server's
    default model, that model's default version); each call may name
    others. `wait_for_ready=True` makes calls wait (within their deadline)
    for an unreachable server to come up instead of failing UNAVAILABLE: for
    riding through the restart of a single server.

    For TLS pass `tls=True` (system roots) or `root_certificates`; add
    `private_key` and `certificate_chain` for mutual TLS. `token` is sent as
    `authorization: Bearer <token>`; `management_token`, when given, instead
    of it on ModelRepository calls. `load_balancing="round_robin"` spreads
    calls over every address of the target (`dns:///name:port` of a headless
    Kubernetes Service, or `ipv4:10.0.0.1:50051,10.0.0.2:50051`). `options`
    are extra gRPC channel arguments; `interceptors` are `grpc` client
    interceptors (they see each call once, not each retry).
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
        if self._credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, self._credentials, options=self._options)
        intercepted = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub = classifier_pb2_grpc.ClassifierStub(intercepted)
        self._repository = classifier_pb2_grpc.ModelRepositoryStub(intercepted)
        # Any: types-grpcio-health-checking's HealthStub declares no methods
        self._health: Any = health_pb2_grpc.HealthStub(intercepted)

    def __enter__(self) -> BitmojiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self,
        name: str,
        rpc: Callable[..., Response],
        request: Any,
        timeout: float | None,
        request_id: str | None,
        *,
        management: bool = False,
        wait: bool | None = None,
    ) -> Response:
        """One unary call; gRPC retries it (the channel's service config) within its one deadline."""
        call_metadata = self._metadata(request_id, management=management)
        try:
            return rpc(
                request,
                timeout=self._deadline(timeout),
                metadata=call_metadata,
                wait_for_ready=self._wait() if wait is None else wait,
            )
        except grpc.RpcError as error:
            raise BitmojiError.from_rpc_error(error, name, request_id) from error

    # -- Classifier ----------------------------------------------------------------------------

    def classify(
        self,
        items: Any,
        *,
        model: str | None = None,
        version: Version | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> list[Prediction]:
        """One prediction per item, in order. `items` is one item or a list of them
        (paths, image bytes, PIL images, numpy arrays, torch tensors; a 4-D array is N items)."""
        request = convert.classify_request(items, *self._route(model, version))
        if not request.inputs:
            return []
        return results.predictions_from(self._call("Classify", self._stub.Classify, request, timeout, request_id))

    def classify_stream(
        self,
        batches: Iterable[Any],
        *,
        model: str | None = None,
        version: Version | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Iterator[list[Prediction]]:
        """Classify each element of `batches` (items, as for `classify`) over one bidirectional
        stream, as the elements come; yields one list of predictions per element, in order.
        gRPC retries a stream only until its first answer arrives (later, part of it was
        answered); the deadline covers the whole stream."""
        failure: list[Exception] = []
        responses = self._stub.StreamClassify(
            convert.stream_requests(batches, failure, *self._route(model, version)),
            timeout=self._deadline(timeout),
            metadata=self._metadata(request_id),
            wait_for_ready=self._wait(),
        )
        try:
            for response in responses:
                yield results.predictions_from(response)
        except grpc.RpcError as error:
            raise failure[0] if failure else BitmojiError.from_rpc_error(error, "StreamClassify", request_id) from error
        finally:
            responses.cancel()  # the caller stopped early; a no-op once the stream is done
        if failure:  # an item we could not convert ended the stream early
            raise failure[0]

    def gradient_probe(
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
        """Loss, outputs and gradients for `inputs` against `targets` (one per output value;
        for the classifiers 1.0 = positive class). `values` returns every parameter
        gradient in full, `saliency` a PNG heat map per image input. Tensors come back
        as `tensor_type`: "auto" (numpy arrays if numpy is installed, else nested lists),
        "numpy", "list" or "torch"."""
        tensors.resolve(tensor_type)  # a missing library fails before the call
        request = convert.probe_request(inputs, targets, loss, values, saliency, *self._route(model, version))
        response = self._call("GradientProbe", self._stub.GradientProbe, request, timeout, request_id)
        return results.probe_result_from(response, tensor_type)

    def model_info(
        self,
        *,
        model: str | None = None,
        version: Version | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ModelInfo:
        """The model (and version) a call naming these would run, how it runs, and its versions."""
        request = base.model_info_request(*self._route(model, version))
        return results.model_info_from(
            self._call("GetModelInfo", self._stub.GetModelInfo, request, timeout, request_id)
        )

    # -- ModelRepository -----------------------------------------------------------------------

    def _manage(
        self, name: str, rpc: Callable[..., Any], request: Any, timeout: float | None, request_id: str | None
    ) -> Any:
        return self._call(name, rpc, request, timeout, request_id, management=True)

    def list_models(
        self, ready_only: bool = False, *, timeout: float | None = None, request_id: str | None = None
    ) -> ModelList:
        """Every model in the server's repository (only those with a READY version, with `ready_only`)."""
        request = pb.ListModelsRequest(ready_only=ready_only)
        return results.model_list_from(
            self._manage("ListModels", self._repository.ListModels, request, timeout, request_id)
        )

    def load_model(
        self,
        name: str,
        versions: Sequence[Version] = (),
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ModelStatus:
        """Load `versions` of model `name` (none named: those its version policy selects). Returns once
        they are READY or FAILED (the status's `reason` says why); give it a deadline for loading."""
        response = self._manage(
            "LoadModel", self._repository.LoadModel, base.load_request(name, versions), timeout, request_id
        )
        return results.model_status_from(response.model)

    def unload_model(
        self,
        name: str,
        versions: Sequence[Version] = (),
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ModelStatus:
        """Unload `versions` of model `name` (every version when none is named)."""
        response = self._manage(
            "UnloadModel", self._repository.UnloadModel, base.unload_request(name, versions), timeout, request_id
        )
        return results.model_status_from(response.model)

    def set_default_version(
        self, name: str, version: Version | None, *, timeout: float | None = None, request_id: str | None = None
    ) -> ModelStatus:
        """The version calls naming none get: promote a candidate or roll back (None or "": unpin,
        the highest READY version)."""
        request = base.default_version_request(name, version)
        response = self._manage("SetDefaultVersion", self._repository.SetDefaultVersion, request, timeout, request_id)
        return results.model_status_from(response.model)

    def set_traffic(
        self,
        name: str,
        canary_version: Version | None = "",
        canary_weight: float = 0.0,
        shadow_version: Version | None = "",
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> ModelStatus:
        """Route `canary_weight` (0..1) of the calls naming no version to `canary_version`, and run them
        on `shadow_version` too, off their path. Sets both rules: "" clears one."""
        request = base.traffic_request(name, canary_version, canary_weight, shadow_version)
        response = self._manage("SetTraffic", self._repository.SetTraffic, request, timeout, request_id)
        return results.model_status_from(response.model)

    # -- Health --------------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """ "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" (a name the server does not know) or "UNKNOWN".
        `service` is "" for the whole server or "bitmoji.v1.Classifier". Never waits for a server
        that is down, even with wait_for_ready: a health check answers now."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._call("Check", self._health.Check, request, timeout, None, wait=False)
        except BitmojiError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return health_status_name(response.status)

    def wait_until_serving(self, timeout: float | None = None, service: str = "") -> None:
        """Block until the server reports SERVING (it says NOT_SERVING while it warms up).
        Raises BitmojiError(DEADLINE_EXCEEDED) if it does not within `timeout` seconds."""
        timeout = self._deadline(timeout)
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=service)
        last = "no answer"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                response = self._health.Check(request, timeout=remaining, wait_for_ready=True, metadata=self._auth)
                last = health_status_name(response.status)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                if error.code() not in STILL_STARTING:
                    raise BitmojiError.from_rpc_error(error, "Check") from error
                last = error.code().name
            time.sleep(min(HEALTH_POLL_SECONDS, max(deadline - time.monotonic(), 0)))
        raise BitmojiError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.target} not SERVING after {timeout:g} s (last: {last})", "Check"
        )
