"""The `bitmoji.v1.Classifier` and `bitmoji.v1.ModelRepository` servicers: protocol in, engine, protocol out.

Shaped like gRPC's own asyncio examples: one coroutine per RPC, each a few
lines that turn the request into plain values, call the engine
(`bitmoji.server.engine`) and build the response. Counting, timing, request
ids and turning the engine's errors into statuses are the interceptor's
(`bitmoji.server.interceptor`), for every RPC alike.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import torch

from bitmoji.server.engine import Engine, InferResult
from bitmoji.server.inputs import InputError, Item, RawTensor
from bitmoji.server.models import ModelStatus, State
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

CLASSIFIER = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
MODEL_REPOSITORY = pb.DESCRIPTOR.services_by_name["ModelRepository"].full_name
LOSSES = {pb.LOSS_UNSPECIFIED: "", pb.LOSS_BCE: "bce", pb.LOSS_MSE: "mse"}
DTYPES = {
    pb.DATA_TYPE_FLOAT32: "float32",
    pb.DATA_TYPE_FLOAT64: "float64",
    pb.DATA_TYPE_FLOAT16: "float16",
    pb.DATA_TYPE_UINT8: "uint8",
}
STATES: dict[State, Any] = {state: pb.ModelState.Value(f"MODEL_STATE_{state.value}") for state in State}
STREAM_WINDOW = 64  # StreamClassify messages in flight per stream (so one stream's messages batch together)


def to_items(inputs) -> list[Item]:
    """`Input` messages -> the engine's items (image bytes, or RawTensor)."""
    items: list[Item] = []
    for index, item in enumerate(inputs):
        kind = item.WhichOneof("kind")
        if kind == "image":
            items.append(item.image)
        elif kind == "tensor":
            tensor = item.tensor
            dtype = DTYPES.get(tensor.dtype)
            if dtype is None:
                name = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else str(tensor.dtype)
                raise InputError(
                    f"inputs[{index}]: unsupported tensor dtype {name}; use FLOAT32, FLOAT64, FLOAT16 or UINT8"
                )
            items.append(RawTensor(dtype, tuple(tensor.shape), tensor.data))
        else:
            raise InputError(f"inputs[{index}]: empty input: set either image or tensor")
    return items


def deadline_of(context) -> float | None:
    """The call's deadline on the time.monotonic() clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Any tensor -> FLOAT32 little-endian proto `Tensor` (copied to CPU)."""
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes())


def status_to_proto(status: ModelStatus) -> pb.ModelStatus:
    def text(version: int | None) -> str:
        return "" if version is None else str(version)

    return pb.ModelStatus(
        name=status.name,
        versions=[
            pb.ModelVersionStatus(
                version=str(v.version),
                state=STATES[v.state],
                reason=v.reason,
                build=v.build,
                architecture=v.architecture,
                memory_bytes=v.memory_bytes,
            )  # fmt: skip
            for v in status.versions
        ],
        default_version=text(status.default_version),
        default_pinned=status.pinned,
        previous_default_version=text(status.previous_default),
        canary_version=text(status.canary_version),
        canary_weight=status.canary_weight,
        shadow_version=text(status.shadow_version),
    )


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, engine: Engine):
        self._engine = engine

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        return await self._classify(request, context)

    async def _classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        result = await self._engine.infer(
            to_items(request.inputs),
            model=request.model_name,
            version=request.model_version,
            deadline=deadline_of(context),
        )
        return _classify_response(result)

    async def StreamClassify(self, request_iterator, context):
        """Each request message is classified as it arrives (messages of one stream batch together); answers in order.

        The first failing message ends the stream with its status; the answers before it were sent.
        """
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
        finally:
            for pending in [reader, *_drain(tasks)]:
                _discard(pending)

    async def GradientProbe(self, request: pb.GradientProbeRequest, context) -> pb.GradientProbeResponse:
        if request.loss not in LOSSES:
            raise InputError(f"unknown loss {request.loss}; use LOSS_BCE or LOSS_MSE")
        outcome = await self._engine.probe(
            to_items(request.inputs), list(request.targets), LOSSES[request.loss],
            model=request.model_name, version=request.model_version, saliency=request.include_saliency_png,
        )  # fmt: skip
        result, values = outcome.result, request.include_values
        return pb.GradientProbeResponse(
            loss=result.loss,
            outputs=tensor_to_proto(result.outputs),
            parameters=[
                pb.ParameterGradient(
                    name=p.name,
                    shape=list(p.gradient.shape),
                    norm=p.norm,
                    max_abs=p.max_abs,
                    mean_abs=p.mean_abs,
                    values=tensor_to_proto(p.gradient) if values else None,
                )  # fmt: skip
                for p in result.parameters
            ],
            input_gradients=[
                pb.InputGradient(gradient=tensor_to_proto(gradient), saliency_png=png)
                for gradient, png in zip(result.input_gradient, outcome.saliency_pngs, strict=True)
            ],
            model_version=outcome.version,
            model_name=outcome.model,
            model_build=outcome.served.build,
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        info = self._engine.model_info(request.model_name, request.model_version)
        loaded, served, batching = info.loaded, info.loaded.served, info.loaded.batching
        return pb.GetModelInfoResponse(
            model_version=loaded.label,
            model_name=loaded.model,
            model_build=served.build,
            architecture=served.architecture,
            class_names=served.loaded.class_names or [],
            positive_class=served.positive_label,
            input_shape=list(served.spec.shape or ()),
            metadata_json=json.dumps(served.loaded.metadata, sort_keys=True),
            device=str(served.device),
            max_batch_size=batching.max_batch_size,
            max_batch_delay_ms=batching.max_batch_delay_ms,
            max_items_per_call=info.config.max_items_per_call,
            torch_threads=info.torch_threads,
            gradient_probe_enabled=info.config.gradient_probe,
            model_sha256=served.loaded.sha256,
            status=status_to_proto(info.status),
        )


def _classify_response(result: InferResult) -> pb.ClassifyResponse:
    positive, negative = result.served.positive_label, result.served.negative_label
    Prediction = pb.Prediction
    return pb.ClassifyResponse(
        predictions=[
            Prediction(label=positive if p >= 0.5 else negative, probability=p, logit=z) for z, p in result.results
        ],
        model_version=result.version,
        model_name=result.model,
        model_build=result.served.build,
    )


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        item = queue.get_nowait()
        if item is not None:
            items.append(item)
    return items


def _discard(task: asyncio.Future) -> None:
    """Cancel a task we no longer need, or collect its exception (so asyncio does not log it as lost)."""
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


class ModelRepositoryServicer(pb_grpc.ModelRepositoryServicer):
    """Management: list, load, unload and route models (the calls that change what is served need the
    management token: see `bitmoji.server.security`)."""

    def __init__(self, engine: Engine):
        self._models = engine.manager

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        statuses = self._models.statuses()
        if request.ready_only:
            statuses = [s for s in statuses if any(v.state is State.READY for v in s.versions)]
        return pb.ListModelsResponse(
            models=[status_to_proto(s) for s in statuses], default_model=self._models.default_model or ""
        )

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        status = await self._models.load(request.model_name, list(request.versions))
        return pb.LoadModelResponse(model=status_to_proto(status))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        status = await self._models.unload(request.model_name, list(request.versions))
        return pb.UnloadModelResponse(model=status_to_proto(status))

    async def SetDefaultVersion(self, request: pb.SetDefaultVersionRequest, context) -> pb.SetDefaultVersionResponse:
        status = self._models.set_default_version(request.model_name, request.version)
        return pb.SetDefaultVersionResponse(model=status_to_proto(status))

    async def SetTraffic(self, request: pb.SetTrafficRequest, context) -> pb.SetTrafficResponse:
        status = self._models.set_traffic(
            request.model_name, request.canary_version, request.canary_weight, request.shadow_version
        )
        return pb.SetTrafficResponse(model=status_to_proto(status))
