"""The Open Inference Protocol (KServe V2) over gRPC: `inference.GRPCInferenceService`, beside `bitmoji.v1.Classifier`.

Generic V2 clients (tritonclient, KServe, Triton's perf_analyzer, grpcurl)
need nothing but ModelMetadata to call the model, named `bitmoji` unless
`--model-name` says otherwise, whose version is the served model's:

    inputs   image          FP32   [-1, 3, 128, 128]  preprocessed: RGB, resized, scaled to [0, 1]
                                                        (`bitmoji.core.preprocess`; the item shape is the model's)
             image_bytes    BYTES  [-1]               encoded images (PNG, JPEG, ...), preprocessed by the
                                                        server exactly like Classify's `image` inputs
    outputs  logits         FP32   [-1, 1]            the model's raw output
             probabilities  FP32   [-1, 1]            sigmoid(logit): the positive class's probability
             labels         BYTES  [-1, 1]            the predicted class name (models with class names only)

A request sends exactly one of the inputs (a model without image
preprocessing takes one FP32 input named `input`). ModelInfer takes the same
path as Classify (`Engine.infer`: admission, routing, then the version's
dynamic batcher, whose model threads decode), so calls of both protocols batch
together, obey the same limits and give the same numbers. Outputs come back in `raw_output_contents`
(what tritonclient reads), in the order asked for; all of them when none is
asked for. Readiness is the health service's: ServerReady and ModelReady say
true exactly while `grpc.health.v1` says SERVING.

Models are the repository's (`--model FILE` is model `--model-name`, version
1): ModelMetadata lists a model's READY versions, a request that names no
version gets the default one (or its canary), and the repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) is Triton's, so
tritonclient's `get_model_repository_index`, `load_model` and `unload_model`
work unchanged (load and unload need --model-control-mode explicit, as in
Triton, and the management token when tokens are on).

Errors are gRPC statuses with a message: INVALID_ARGUMENT for a wrong input
or output name, datatype, shape or size; NOT_FOUND for an unknown model or
version; the rest as Classify's (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...).
Every RPC is counted in the request metrics under its own name.

tritonclient ships its own copy of the `inference.*` protobuf messages, so it
and this module cannot be imported into one Python process (protobuf refuses
the duplicate symbols); `bitmoji.server.main` imports this module only when it serves.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import math
import re
import struct

import numpy as np

from bitmoji.inference import grpc_service_pb2 as kpb
from bitmoji.inference import grpc_service_pb2_grpc as kpb_grpc
from bitmoji.server.classifier import deadline_of
from bitmoji.server.engine import Engine
from bitmoji.server.errors import InvalidArgument
from bitmoji.server.inputs import MAX_RANK, InputError, Item, RawTensor
from bitmoji.server.model import ServedModel
from bitmoji.server.models import State

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "bitmoji-serve"
PLATFORM = "pytorch_torchscript"
EXTENSION_REPOSITORY = "model_repository"
FP32, BYTES = "FP32", "BYTES"
IMAGE, IMAGE_BYTES, INPUT = "image", "image_bytes", "input"
LOGITS, PROBABILITIES, LABELS = "logits", "probabilities", "labels"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix in raw contents


def _server_version() -> str:
    try:
        return importlib.metadata.version("bitmoji-serving")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message)


# -- the model's signature ------------------------------------------------------


def input_tensors(model: ServedModel) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of each input the served model takes; -1 = any size."""
    spec = model.spec
    item = list(spec.shape) if spec.shape is not None else []  # undeclared: [-1] only, any item shape
    if spec.image_size is None:
        return [(INPUT, FP32, [-1, *item])]
    return [(IMAGE, FP32, [-1, *item]), (IMAGE_BYTES, BYTES, [-1])]


def output_tensors(model: ServedModel) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of each output."""
    outputs = [(LOGITS, FP32, [-1, 1]), (PROBABILITIES, FP32, [-1, 1])]
    if model.positive_label:
        outputs.append((LABELS, BYTES, [-1, 1]))
    return outputs


def _describe(tensors) -> str:
    return ", ".join(f"{name} ({datatype} {shape})" for name, datatype, shape in tensors)


# -- tensors in, tensors out ----------------------------------------------------


def split_bytes(raw: bytes, what: str) -> list[bytes]:
    """Raw BYTES contents (each element: 4-byte little-endian length, then the bytes) -> the elements."""
    out: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 4 > end:
            raise invalid(f"{what}: raw BYTES contents end inside an element's 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise invalid(f"{what}: raw BYTES element {len(out)} says {length} bytes; only {end - offset} are left")
        out.append(raw[offset : offset + length])
        offset += length
    return out


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def _fp32_bytes(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


async def decode_request(request: kpb.ModelInferRequest, model: ServedModel) -> list[Item]:
    """A ModelInfer request -> the engine's items (one per batch row), checked against the signature."""
    signature = input_tensors(model)
    if len(request.inputs) != 1:
        raise invalid(
            f"send exactly one input tensor (got {len(request.inputs)}); the model takes one of: {_describe(signature)}"
        )
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} input tensors")
    tensor = request.inputs[0]
    name, datatype = tensor.name, tensor.datatype
    expected = {n: (d, s) for n, d, s in signature}
    if name not in expected:
        raise invalid(f"unknown input {name!r}; the model takes one of: {_describe(signature)}")
    want_type, want_shape = expected[name]
    if datatype != want_type:
        raise invalid(
            f"input {name!r}: datatype {datatype or '(empty)'} is not supported; send {want_type} {want_shape}"
        )
    if raw and tensor.HasField("contents"):
        raise invalid(f"input {name!r}: set contents or raw_input_contents, not both")
    if datatype == BYTES:
        return _decode_bytes(tensor, raw[0] if raw else None, want_shape)
    return await _decode_fp32(tensor, raw[0] if raw else None, model, want_shape)


def _decode_bytes(tensor, raw: bytes | None, want_shape: list[int]) -> list[Item]:
    name, shape = tensor.name, list(tensor.shape)
    if len(shape) not in (1, 2) or shape[0] < 1 or (len(shape) == 2 and shape[1] != 1):
        raise invalid(
            f"input {name!r}: shape {shape} does not match {want_shape}: send [N] (or [N, 1]) encoded images, N >= 1"
        )
    elements = split_bytes(raw, f"input {name!r}") if raw is not None else list(tensor.contents.bytes_contents)
    if len(elements) != shape[0]:
        raise invalid(f"input {name!r}: shape {shape} says {shape[0]} elements; the contents hold {len(elements)}")
    return list(elements)


async def _decode_fp32(tensor, raw: bytes | None, model: ServedModel, want_shape: list[int]) -> list[Item]:
    name, shape = tensor.name, list(tensor.shape)
    item = model.spec.shape
    if item is not None:
        if len(shape) != len(want_shape) or shape[0] < 1 or tuple(shape[1:]) != tuple(item):
            raise invalid(f"input {name!r}: shape {shape} does not match {want_shape} (the batch size N >= 1 first)")
    elif len(shape) < 2 or len(shape) > MAX_RANK + 1 or min(shape) < 1:
        raise invalid(
            f"input {name!r}: shape {shape}: send [N, ...item dimensions], all positive, at most {MAX_RANK} item dimensions"
        )
    n, per_item = shape[0], math.prod(shape[1:])
    if raw is None:
        count = len(tensor.contents.fp32_contents)
        if count != n * per_item:
            raise invalid(
                f"input {name!r}: contents.fp32_contents has {count} values; shape {shape} needs {n * per_item}"
            )
        raw = await asyncio.to_thread(
            _fp32_bytes, tensor.contents.fp32_contents
        )  # a big repeated field is slow to convert
    elif len(raw) != n * per_item * 4:
        raise invalid(
            f"input {name!r}: raw_input_contents has {len(raw)} bytes; shape {shape} of FP32 needs {n * per_item * 4}"
        )
    size, item_shape = per_item * 4, tuple(shape[1:])
    return [RawTensor("float32", item_shape, raw[i * size : (i + 1) * size]) for i in range(n)]


def requested_outputs(request: kpb.ModelInferRequest, model: ServedModel) -> list[tuple[str, str]]:
    """(name, datatype) of the outputs to send, in the order asked for (duplicates once); all when none is asked for."""
    available = {name: datatype for name, datatype, _ in output_tensors(model)}
    if not request.outputs:
        return list(available.items())
    wanted: dict[str, str] = {}
    for output in request.outputs:
        if output.name not in available:
            raise invalid(f"unknown output {output.name!r}; the model has: {_describe(output_tensors(model))}")
        wanted.setdefault(output.name, available[output.name])
    return list(wanted.items())


def encode_outputs(response: kpb.ModelInferResponse, outputs, results: list, model: ServedModel) -> None:
    """Fill the response's outputs and raw_output_contents from one (logit, probability) per item."""
    n = len(results)
    values = np.asarray(results, dtype="<f4").reshape(n, 2)
    for name, datatype in outputs:
        if name == LABELS:
            data = join_bytes([model.label(float(p)).encode() for _, p in results])
        else:
            data = np.ascontiguousarray(values[:, 0 if name == LOGITS else 1]).tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=[n, 1])
        response.raw_output_contents.append(data)


def _relabel(error: InputError, name: str) -> InputError:
    """Classify's `inputs[3]: ...` -> `image_bytes[3]: ...`: name the tensor the caller sent."""
    return InputError(re.sub(r"^inputs\[", f"{name}[", str(error)))


# -- the servicer -----------------------------------------------------------------


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over the engine's models."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._models = engine.manager
        self._version = _server_version()

    def _model(self, name: str, version: str) -> tuple[ServedModel, str]:
        """The model version a request names (the default one when it names none): (model, version label)."""
        if not name:
            raise invalid("model_name is required")
        loaded = self._models.loaded(name, version)
        return loaded.served, loaded.label

    async def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=True)  # answering at all is being live

    async def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=self._engine.is_ready())

    async def ModelReady(self, request, context):
        self._models.entry(request.name)  # NOT_FOUND for a model the repository does not have
        return kpb.ModelReadyResponse(ready=self._engine.is_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=[EXTENSION_REPOSITORY])

    async def ModelMetadata(self, request, context):
        model, _ = self._model(request.name, request.version)
        status = self._models.status(request.name)
        TensorMetadata = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=request.name,
            versions=[str(v.version) for v in status.versions if v.state is State.READY],
            platform=PLATFORM,
            inputs=[TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in input_tensors(model)],
            outputs=[TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in output_tensors(model)],
        )

    async def ModelInfer(self, request, context):
        model, _ = self._model(request.model_name, request.model_version)  # the signature to check against
        outputs = requested_outputs(request, model)
        items = await decode_request(request, model)
        try:
            result = await self._engine.infer(
                items, model=request.model_name, version=request.model_version, deadline=deadline_of(context)
            )
        except InputError as exc:
            raise _relabel(exc, request.inputs[0].name) from None
        response = kpb.ModelInferResponse(model_name=result.model, model_version=result.version, id=request.id)
        encode_outputs(response, outputs, result.results, result.served)
        return response

    # -- the model repository extension (Triton's) --

    async def RepositoryIndex(self, request, context):
        Index = kpb.RepositoryIndexResponse.ModelIndex
        models = []
        for status in self._models.statuses():
            for v in status.versions:
                if request.ready and v.state is not State.READY:
                    continue
                state = "UNAVAILABLE" if v.state is State.FAILED else v.state.value  # Triton has no FAILED
                models.append(Index(name=status.name, version=str(v.version), state=state, reason=v.reason))
        return kpb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request, context):
        status = await self._models.load(request.model_name)
        failed = [v for v in status.versions if v.state is State.FAILED]
        if failed and not any(v.state is State.READY for v in status.versions):
            raise invalid(
                f"failed to load {request.model_name!r}: "
                + "; ".join(f"version {v.version}: {v.reason}" for v in failed)
            )
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._models.unload(request.model_name)
        return kpb.RepositoryModelUnloadResponse()
