"""The Open Inference Protocol codec in-process (bitmoji.server.kserve_codec), fed tritonclient's own messages.

No server: requests built with the message classes of tritonclient (a client
this project did not write) go through decode_request, requested_outputs and
encode_outputs; what comes out are the engine's items, or an INVALID_ARGUMENT
naming the problem. The servicer around it is tests/e2e/test_kserve.py's.
"""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
from helpers import export_faulty_model, export_test_model, small_image
from tritonclient.grpc import service_pb2 as tpb

from bitmoji.core.modelfile import load_model
from bitmoji.server.errors import InvalidArgument
from bitmoji.server.inputs import RawTensor
from bitmoji.server.kserve_codec import (
    decode_request,
    encode_outputs,
    input_tensors,
    join_bytes,
    output_tensors,
    requested_outputs,
    split_bytes,
)
from bitmoji.server.model import ServedModel


@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> ServedModel:
    path = export_test_model("mlp", tmp_path_factory.mktemp("models") / "mlp.pt")
    return ServedModel.create(load_model(path), max_pixels=1 << 24)


@pytest.fixture(scope="module")
def tensor_model(tmp_path_factory) -> ServedModel:
    path = export_faulty_model(tmp_path_factory.mktemp("models") / "faulty.pt")
    return ServedModel.create(load_model(path), max_pixels=1 << 24)


def request(name: str, datatype: str, shape: list[int], raw: bytes | None = None, **contents) -> tpb.ModelInferRequest:
    message = tpb.ModelInferRequest(model_name="bitmoji")
    tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
    if contents:
        for field, values in contents.items():
            getattr(tensor.contents, field).extend(values)
    if raw is not None:
        message.raw_input_contents.append(raw)
    return message


def decode(message, model):
    return asyncio.run(decode_request(message, model))


def test_the_signature_is_the_models(image_model, tensor_model):
    assert input_tensors(image_model) == [("image", "FP32", [-1, 3, 128, 128]), ("image_bytes", "BYTES", [-1])]
    assert input_tensors(tensor_model) == [("input", "FP32", [-1, 2])]
    assert [name for name, *_ in output_tensors(image_model)] == ["logits", "probabilities", "labels"]
    assert [name for name, *_ in output_tensors(tensor_model)] == ["logits", "probabilities"]  # no class names


def test_raw_and_typed_contents_decode_to_the_same_items(image_model, tensor_model):
    images = [small_image(128, seed) for seed in range(3)]
    assert decode(request("image_bytes", "BYTES", [3], raw=join_bytes(images)), image_model) == images
    assert decode(request("image_bytes", "BYTES", [3, 1], bytes_contents=images), image_model) == images
    rows = np.array([[0.5, 0.0], [-1.0, 2.0]], dtype="<f4")
    raw = decode(request("input", "FP32", [2, 2], raw=rows.tobytes()), tensor_model)
    typed = decode(request("input", "FP32", [2, 2], fp32_contents=rows.ravel().tolist()), tensor_model)
    assert raw == typed == [RawTensor("float32", (2,), row.tobytes()) for row in rows]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: request("pixels", "FP32", [1, 2], raw=b"\0" * 8), "unknown input 'pixels'; the model takes one of"),
        (lambda: request("input", "INT32", [1, 2], raw=b"\0" * 8), "datatype INT32 is not supported; send FP32"),
        (lambda: request("input", "FP32", [1, 3], raw=b"\0" * 12), "shape [1, 3] does not match [-1, 2]"),
        (lambda: request("input", "FP32", [2, 2], raw=b"\0" * 12), "has 12 bytes; shape [2, 2] of FP32 needs 16"),
        (lambda: request("input", "FP32", [2, 2], fp32_contents=[1.0] * 3), "has 3 values; shape [2, 2] needs 4"),
        (lambda: tpb.ModelInferRequest(model_name="bitmoji"), "send exactly one input tensor (got 0)"),
    ],
)
def test_bad_tensors_are_invalid_argument_naming_the_problem(tensor_model, build, message):
    with pytest.raises(InvalidArgument) as info:
        decode(build(), tensor_model)
    assert message in str(info.value)


def test_bad_bytes_framing_and_contradicting_shapes_are_invalid_argument(image_model):
    image = small_image(64)
    cut = struct.pack("<I", len(image) + 10) + image  # says 10 more bytes than follow
    for message, words in (
        (request("image_bytes", "BYTES", [1], raw=cut), "only"),
        (request("image_bytes", "BYTES", [2], raw=join_bytes([image])), "says 2 elements; the contents hold 1"),
        (request("image_bytes", "BYTES", [1, 2], bytes_contents=[image]), "does not match [-1]"),
        (request("image_bytes", "BYTES", [1], raw=b"\x01\x00"), "inside an element's 4-byte length prefix"),
    ):
        with pytest.raises(InvalidArgument, match="image_bytes") as info:
            decode(message, image_model)
        assert words in str(info.value)
    assert split_bytes(join_bytes([b"", b"ab"]), "x") == [b"", b"ab"]


def test_outputs_are_the_ones_asked_for_in_their_order_and_raw(image_model):
    message = tpb.ModelInferRequest(model_name="bitmoji")
    for name in ("labels", "logits", "labels"):
        message.outputs.add(name=name)
    outputs = requested_outputs(message, image_model)
    assert outputs == [("labels", "BYTES"), ("logits", "FP32")]  # a duplicate is sent once
    response = tpb.ModelInferResponse()
    encode_outputs(response, outputs, [[1.5, 0.8], [-2.0, 0.1]], image_model)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("labels", "BYTES", [2, 1]),
        ("logits", "FP32", [2, 1]),
    ]
    labels, logits = response.raw_output_contents
    assert split_bytes(labels, "labels") == [b"eva", b"not_eva"]
    assert np.frombuffer(logits, "<f4").tolist() == [1.5, -2.0]
    everything = requested_outputs(tpb.ModelInferRequest(), image_model)
    assert [name for name, _ in everything] == ["logits", "probabilities", "labels"]
    unknown = tpb.ModelInferRequest()
    unknown.outputs.add(name="embedding")
    with pytest.raises(InvalidArgument, match="unknown output 'embedding'"):
        requested_outputs(unknown, image_model)


def test_an_image_sent_as_fp32_pixels_decodes_to_the_items_shape(image_model):
    pixels = np.zeros((1, 3, 128, 128), dtype="<f4")
    (item,) = decode(request("image", "FP32", [1, 3, 128, 128], raw=pixels.tobytes()), image_model)
    assert item.shape == (3, 128, 128) and len(item.data) == pixels.nbytes
