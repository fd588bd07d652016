"""The blocking client: one channel, one method per RPC, retries and deadlines on every call."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitmoji.client import channel, convert, results
from bitmoji.client.errors import BitmojiError
from bitmoji.client.results import ModelInfo, Prediction, ProbeResult
from bitmoji.client.retry import call_with_retries
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc

HEALTH_POLL_SECONDS = 0.1
# While a server starts: not reachable yet, or its health service does not know the name yet.
STILL_STARTING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND)


def health_status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


class BitmojiClient:
    """A connection to a bitmoji `Classifier` server.

    Make one and share it (it is thread-safe; a channel is costly to set up),
    close it with `close()` or a `with` block. Every call has a deadline
    (`timeout` seconds, covering its retries), is retried on UNAVAILABLE
    `retries` times with exponential backoff from `backoff` seconds, and
    raises `BitmojiError` (with the gRPC `code` and `details`) when it fails.
    Bad arguments raise TypeError/ValueError before anything is sent; an
    unreadable file raises OSError.

    For TLS pass `tls=True` (system roots) or `root_certificates`; add
    `private_key` and `certificate_chain` for mutual TLS. `token` is sent as
    `authorization: Bearer <token>`. `load_balancing="round_robin"` with a
    `dns:///name:port` target spreads calls over all the name's addresses
    (e.g. a headless Kubernetes Service). `options` are extra gRPC channel
    arguments; `interceptors` are `grpc` client interceptors.
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
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        intercepted = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub = classifier_pb2_grpc.ClassifierStub(intercepted)
        self._health = health_pb2_grpc.HealthStub(intercepted)
        self._metadata = channel.call_metadata(token)

    def __repr__(self) -> str:
        return f"BitmojiClient({self.target!r}, timeout={self.timeout}, retries={self.retries})"

    def __enter__(self) -> BitmojiClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, name: str, rpc, request, timeout: float | None):
        return call_with_retries(
            lambda remaining: rpc(request, timeout=remaining, metadata=self._metadata),
            method=name,
            timeout=self.timeout if timeout is None else timeout,
            retries=self.retries,
            backoff=self.backoff,
        )

    def classify(self, items, *, timeout: float | None = None) -> list[Prediction]:
        """One prediction per item, in order. `items` is one item or a list of them
        (paths, image bytes, PIL images, numpy arrays, torch tensors; a 4-D array is N items)."""
        request = convert.classify_request(items)
        if not request.inputs:
            return []
        return results.predictions_from(self._call("Classify", self._stub.Classify, request, timeout))

    def classify_stream(self, batches: Iterable, *, timeout: float | None = None) -> Iterator[list[Prediction]]:
        """Classify each element of `batches` (items, as for `classify`) over one bidirectional
        stream, as the elements come; yields one list of predictions per element, in order.
        Not retried (part of the stream may have been answered); the deadline covers the whole stream."""
        failure: list[Exception] = []
        responses = self._stub.StreamClassify(
            convert.stream_requests(batches, failure),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )
        try:
            for response in responses:
                yield results.predictions_from(response)
        except grpc.RpcError as error:
            raise failure[0] if failure else BitmojiError.from_rpc_error(error, "StreamClassify") from error
        finally:
            responses.cancel()  # the caller stopped early; a no-op once the stream is done
        if failure:  # an item we could not convert ended the stream early
            raise failure[0]

    def gradient_probe(
        self,
        inputs,
        targets,
        loss: str = "bce",
        *,
        values: bool = False,
        saliency: bool = False,
        timeout: float | None = None,
    ) -> ProbeResult:
        """Loss, outputs and gradients for `inputs` against `targets` (one per output value;
        for the classifiers 1.0 = positive class). `values` returns every parameter
        gradient in full, `saliency` a PNG heat map per image input."""
        request = convert.probe_request(inputs, targets, loss, values, saliency)
        return results.probe_result_from(self._call("GradientProbe", self._stub.GradientProbe, request, timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        response = self._call("GetModelInfo", self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return results.model_info_from(response)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """ "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" (a name the server does not know) or "UNKNOWN".
        `service` is "" for the whole server or "bitmoji.v1.Classifier"."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._call("Check", self._health.Check, request, timeout)
        except BitmojiError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return health_status_name(response.status)

    def wait_until_serving(self, timeout: float | None = None, service: str = "") -> None:
        """Block until the server reports SERVING (it says NOT_SERVING while it warms up).
        Raises BitmojiError(DEADLINE_EXCEEDED) if it does not within `timeout` seconds."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=service)
        last = "no answer"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                response = self._health.Check(request, timeout=remaining, wait_for_ready=True, metadata=self._metadata)
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
