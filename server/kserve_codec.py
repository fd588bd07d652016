"""The Open Inference Protocol's tensors <-> the engine's items and results: the codec under `bitmoji.server.kserve`.

Duck-typed over the protocol's messages (ModelInferRequest, ModelInferResponse):
it never imports the generated stubs, so it can be tested with any copy of the
protocol's messages (tests/test_kserve_codec.py uses tritonclient's, a client
this project did not write). See `bitmoji.server.kserve` for the signature the
server publishes and the rules it follows.
"""

from __future__ import annotations

import asyncio
import math
import re
import struct
from typing import Any

import numpy as np

from bitmoji.server.errors import InvalidArgument
from bitmoji.server.inputs import MAX_RANK, InputError, Item, RawTensor
from bitmoji.server.model import ServedModel

ModelInferRequest = Any  # inference.ModelInferRequest: any copy of the message
ModelInferResponse = Any

FP32, BYTES = "FP32", "BYTES"
IMAGE, IMAGE_BYTES, INPUT = "image", "image_bytes", "input"
LOGITS, PROBABILITIES, LABELS = "logits", "probabilities", "labels"
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix in raw contents


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


async def decode_request(request: ModelInferRequest, model: ServedModel) -> list[Item]:
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
            f"input {name!r}: shape {shape}: send [N, ...item dimensions], all positive, "
            f"at most {MAX_RANK} item dimensions"
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


def requested_outputs(request: ModelInferRequest, model: ServedModel) -> list[tuple[str, str]]:
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


def encode_outputs(response: ModelInferResponse, outputs, results: list, model: ServedModel) -> None:
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


def relabel(error: InputError, name: str) -> InputError:
    """Classify's `inputs[3]: ...` -> `image_bytes[3]: ...`: name the tensor the caller sent."""
    return InputError(re.sub(r"^inputs\[", f"{name}[", str(error)))
