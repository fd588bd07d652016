"""The `bitmoji.v1.Classifier` servicer: requests in, batcher and probes, responses out.

Shaped like gRPC's own asyncio examples: one coroutine per RPC. Per-call work
on the event loop is kept small: decoding and the forward pass run on the
batcher's model threads, GradientProbe on a thread of its own (so a
probe never holds up a batch). Every RPC is counted and timed by `observed`,
and every failure becomes a status code with a message (see `_status`), never
a crash and never a payload in the logs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from concurrent.futures import Executor

import grpc
import torch

from bitmoji.core.gradients import ProbeError, gradient_probe
from bitmoji.server.batcher import Batcher, BatchFailed, DeadlineExpired, QueueFull, ShuttingDown, build_batch
from bitmoji.server.config import ServerConfig
from bitmoji.server.inputs import InputError, decode_input, tensor_to_proto
from bitmoji.server.metrics import Metrics
from bitmoji.server.model import ServedModel, error_summary
from bitmoji.server.saliency import saliency_png
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger("bitmoji-serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
LOSSES = {pb.LOSS_BCE: "bce", pb.LOSS_MSE: "mse"}
DEADLINE_SLACK_S = 0.05  # a cancel this close to the call's deadline is counted as the deadline (see _cancel_code)
STREAM_WINDOW = 64  # StreamClassify messages in flight per stream (so one stream's messages batch together)


class ServiceError(Exception):
    """Ends the RPC with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# Expected failures and the status each one becomes. Anything else is INTERNAL (and logged).
_CODES = {
    InputError: grpc.StatusCode.INVALID_ARGUMENT,
    ProbeError: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    BatchFailed: grpc.StatusCode.INTERNAL,
}


def _status(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    code = _CODES.get(type(exc))
    if code is not None:
        return code, str(exc)
    log.exception("%s: unexpected error", method)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}"


def observed(method: str):
    """Count, time and map errors to statuses for one unary RPC of a servicer with `begin_call()` and
    `end_call(method, code, start)` (ClassifierService, and the KServe servicer that shares its bookkeeping)."""

    def decorate(handler):
        @functools.wraps(handler)
        async def wrapper(self: ClassifierService, request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            self.begin_call()
            try:
                return await handler(self, request, context)
            except asyncio.CancelledError:
                code = _cancel_code(context)
                raise
            except Exception as exc:
                code, message = _status(exc, method)
                await context.abort(code, message)
            finally:
                self.end_call(method, code, start)

        return wrapper

    return decorate


def _cancel_code(context) -> grpc.StatusCode:
    # The client's deadline timer fires a little before the server's copy of it (which started when the call
    # arrived: 4 ms later on a busy box), so the client's cancel comes first: that close to the deadline, it is one.
    remaining = context.time_remaining()
    return (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if remaining is not None and remaining <= DEADLINE_SLACK_S
        else grpc.StatusCode.CANCELLED
    )


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _discard(task: asyncio.Future) -> None:
    """Cancel a task we no longer need, or collect its exception (so asyncio does not log it as lost)."""
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(
        self, config: ServerConfig, batcher: Batcher, metrics: Metrics, *, probe_pool: Executor, torch_threads: int
    ):
        self._config = config
        self._batcher = batcher
        self._metrics = metrics
        self._probe_pool = probe_pool
        self._torch_threads = torch_threads
        self.active = 0  # RPCs being handled (what a graceful shutdown waits for)

    # -- bookkeeping ----------------------------------------------------------

    def begin_call(self) -> None:
        """An RPC started: counted in flight until `end_call`, and waited for by `drain`."""
        self.active += 1
        self._metrics.inflight.inc()

    def end_call(self, method: str, code: grpc.StatusCode, start: float) -> None:
        self.active -= 1
        self._metrics.inflight.dec()
        self._metrics.requests.labels(method, code.name).inc()
        self._metrics.request_duration.labels(method).observe(time.perf_counter() - start)

    async def drain(self, timeout: float) -> bool:
        """Wait until no RPC is being handled, at most `timeout` seconds; True if drained."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.active

    @property
    def model(self) -> ServedModel:
        return self._batcher.model

    def swap_model(self, served: ServedModel) -> ServedModel:
        """Serve `served` (checked and warmed up: see `bitmoji.server.reload`) from the next batch on; returns the model it replaced."""
        old = self._batcher.swap_model(served)
        self._metrics.set_model(served.version, str(served.device), served.loaded.metadata.get("architecture") or "")
        return old

    # -- Classify -------------------------------------------------------------

    @observed("Classify")
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        return await self._classify(request, context)

    async def StreamClassify(self, request_iterator, context):
        """Each request message is classified as it arrives (messages of one stream batch together); answers in order.

        The first failing message ends the stream with its status; the answers before it were sent.
        """
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self.begin_call()
        window = asyncio.Semaphore(STREAM_WINDOW)
        tasks: asyncio.Queue = asyncio.Queue()

        async def read():
            try:
                async for request in request_iterator:
                    await window.acquire()
                    tasks.put_nowait(asyncio.ensure_future(self._classify(request, context)))
            finally:
                tasks.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await tasks.get()) is not None:
                response = await task
                window.release()
                yield response
            await reader  # re-raises a broken request stream
        except asyncio.CancelledError:
            code = _cancel_code(context)
            raise
        except Exception as exc:
            code, message = _status(exc, "StreamClassify")
            await context.abort(code, message)
        finally:
            for task in [reader, *(t for t in _drain(tasks) if t is not None)]:
                _discard(task)
            self.end_call("StreamClassify", code, start)

    async def _classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        results, model = await self.infer(request.inputs, context)
        positive, negative = model.positive_label, model.negative_label
        Prediction = pb.Prediction
        return pb.ClassifyResponse(
            predictions=[
                Prediction(label=positive if p >= 0.5 else negative, probability=p, logit=z) for z, p in results
            ],
            model_version=model.version,
        )

    async def infer(self, inputs, context) -> tuple[list, ServedModel]:
        """The path of every inference (Classify's, and ModelInfer's in `bitmoji.server.kserve`): check, then queue raw items.

        The batcher's model threads decode and run them. Returns one [logit, probability] per item and the
        model that ran them.
        """
        n = len(inputs)
        if n == 0:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "empty request: send at least one input")
        if n > self._config.max_items_per_call:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"too many inputs: {n}; at most {self._config.max_items_per_call} per call (split the request)",
            )
        arrived = time.monotonic()
        remaining = context.time_remaining()
        deadline = arrived + remaining if remaining is not None else None
        return await self._batcher.run(inputs, arrived=arrived, deadline=deadline)

    # -- GradientProbe --------------------------------------------------------

    @observed("GradientProbe")
    async def GradientProbe(self, request: pb.GradientProbeRequest, context) -> pb.GradientProbeResponse:
        if not self._config.gradient_probe:
            # UNIMPLEMENTED: "not implemented or not supported/enabled in this service" (gRPC's status
            # definitions); clients must not retry it, and it says nothing about the caller's rights.
            raise ServiceError(
                grpc.StatusCode.UNIMPLEMENTED, "GradientProbe is disabled on this server (--disable-gradient-probe)"
            )
        n = len(request.inputs)
        if n == 0:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "empty request: send at least one input")
        if n > self._config.max_probe_inputs:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"too many inputs: {n}; at most {self._config.max_probe_inputs} per probe",
            )
        model = self._batcher.model
        loss = self._loss(request.loss, model)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._probe_pool, self._probe, request, model, loss)

    @staticmethod
    def _loss(value: int, model: ServedModel) -> str:
        if value == pb.LOSS_UNSPECIFIED:
            if model.loaded.class_names:
                return "bce"
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "loss unspecified and the model has no class names: set LOSS_BCE or LOSS_MSE",
            )
        if value not in LOSSES:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown loss {value}; use LOSS_BCE or LOSS_MSE")
        return LOSSES[value]

    def _probe(self, request: pb.GradientProbeRequest, model: ServedModel, loss: str) -> pb.GradientProbeResponse:
        """On the probe thread: forward, loss and backward with autograd (no `.grad`, no train mode)."""
        tensors = [decode_input(item, i, model.spec) for i, item in enumerate(request.inputs)]
        shapes = [list(t.shape) for t in tensors]
        if any(s != shapes[0] for s in shapes):
            raise InputError(f"inputs: all inputs of one probe must have the same shape (got {shapes})")
        x = model.to_device(build_batch(tensors))
        targets = torch.tensor(list(request.targets), dtype=torch.float32)
        try:
            result = gradient_probe(model.module, x, targets, loss)
        except ProbeError:
            raise
        except Exception as exc:
            raise BatchFailed(f"gradient probe failed in the model: {error_summary(exc)}") from None
        self._metrics.probes.labels(loss).inc()
        values = request.include_values
        parameters = [
            pb.ParameterGradient(
                name=p.name,
                shape=list(p.gradient.shape),
                norm=p.norm,
                max_abs=p.max_abs,
                mean_abs=p.mean_abs,
                values=tensor_to_proto(p.gradient) if values else None,
            )
            for p in result.parameters
        ]
        input_gradients = []
        for i, gradient in enumerate(result.input_gradient):
            png = b""
            if request.include_saliency_png and gradient.dim() == 3 and gradient.shape[0] in (1, 3):
                png = saliency_png(x[i], gradient)
            input_gradients.append(pb.InputGradient(gradient=tensor_to_proto(gradient), saliency_png=png))
        return pb.GradientProbeResponse(
            loss=result.loss,
            outputs=tensor_to_proto(result.outputs),
            parameters=parameters,
            input_gradients=input_gradients,
            model_version=model.version,
        )

    # -- GetModelInfo ---------------------------------------------------------

    @observed("GetModelInfo")
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        model = self._batcher.model
        loaded, config = model.loaded, self._config
        return pb.GetModelInfoResponse(
            model_version=model.version,
            architecture=loaded.metadata.get("architecture", "") or "",
            class_names=loaded.class_names or [],
            positive_class=model.positive_label,
            input_shape=list(model.spec.shape or ()),
            metadata_json=json.dumps(loaded.metadata, sort_keys=True),
            device=str(model.device),
            max_batch_size=config.max_batch_size,
            max_batch_delay_ms=config.max_batch_delay_ms,
            max_items_per_call=config.max_items_per_call,
            torch_threads=self._torch_threads,
            gradient_probe_enabled=config.gradient_probe,
            model_sha256=loaded.sha256,
        )
