"""The Open Inference Protocol (KServe V2) service, called by NVIDIA's tritonclient:
a client this project did not write.

One server (the CNN model, `--model-name bitmoji-cnn`) serves the module.
Inferences through tritonclient must equal the project's own Classify on the
same images, for both inputs: the preprocessed FP32 tensor and the encoded
images (BYTES). Requests tritonclient cannot send (typed `contents`, sizes
that contradict the shape) go through tritonclient's own generated stubs.

tritonclient carries its own copy of the `inference.*` protobuf messages, so
this process must never import the server's (`bitmoji.server.kserve`,
`bitmoji.inference.grpc_service_pb2`): protobuf refuses duplicate symbols.
"""

from __future__ import annotations

import sys

if (
    "bitmoji.inference.grpc_service_pb2" in sys.modules
):  # pragma: no cover - a test elsewhere imported bitmoji.server.kserve
    raise ImportError(
        "the server's inference stubs are loaded in this process; tritonclient's cannot be (see the docstring)"
    )

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2
from helpers import health_status, image_input, scrape, start_server, synthetic_images, tensor_input, total
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from bitmoji.core.modelfile import load_model
from bitmoji.core.preprocess import load_image, to_model_input
from bitmoji.server.config import parse_config
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

MODEL = "bitmoji-cnn"
KSERVE = "inference.GRPCInferenceService"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(cnn_model_file):
    started = start_server(cnn_model_file, "--model-name", MODEL, "--max-items-per-call", "16")
    yield started
    assert started.stop() == 0, started.output()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def classify(channel):
    stub = pb_grpc.ClassifierStub(channel)
    return lambda inputs: stub.Classify(pb.ClassifyRequest(inputs=inputs), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def loaded(cnn_model_file):
    return load_model(cnn_model_file)


def preprocessed(images: list[bytes]) -> np.ndarray:
    """What the FP32 input takes: the trainer's preprocessing, done by the caller."""
    return to_model_input(torch.stack([load_image(b) for b in images])).numpy()


def fp32_input(array: np.ndarray, name: str = "image") -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def bytes_input(images: list[bytes], name: str = "image_bytes") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def infer(client, *inputs, **kwargs):
    return client.infer(MODEL, list(inputs), client_timeout=TIMEOUT, **kwargs)


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def assert_equals_classify(result, response: pb.ClassifyResponse, *, labels: bool = True):
    logits, probabilities = result.as_numpy("logits"), result.as_numpy("probabilities")
    n = len(response.predictions)
    assert logits.shape == probabilities.shape == (n, 1) and logits.dtype == probabilities.dtype == np.float32
    # Both are float32 on the wire; the same batch on the same model gives the same numbers.
    np.testing.assert_allclose(logits[:, 0], [p.logit for p in response.predictions], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities[:, 0], [p.probability for p in response.predictions], rtol=1e-5, atol=1e-6)
    if labels:
        assert [label.decode() for label in result.as_numpy("labels")[:, 0]] == [p.label for p in response.predictions]
    assert result.get_response().model_version == response.model_version


# -- readiness and metadata -------------------------------------------------------------


def test_live_and_ready(client, loaded, channel):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1")
    assert not client.is_model_ready(MODEL, model_version="2")  # the repository has no version 2
    # the same readiness as the health service, which lists the KServe service too
    assert health_status(channel, KSERVE) == health_pb2.HealthCheckResponse.SERVING


def test_another_model_or_version_is_not_found(client):
    for call in (
        lambda: client.is_model_ready("bitmoji"),  # the default name: this server was given another
        lambda: client.get_model_metadata("bitmoji"),
        lambda: client.get_model_metadata(MODEL, model_version="no-such-version"),
        lambda: client.get_model_metadata(MODEL, model_version="2"),
        lambda: client.infer("bitmoji", [fp32_input(np.zeros((1, 3, 128, 128), np.float32))], client_timeout=TIMEOUT),
    ):
        error = refused(call)
        assert error.status() == "StatusCode.NOT_FOUND", error
    assert "bitmoji-cnn" in refused(client.get_model_metadata, "bitmoji").message()


def test_server_metadata(client):
    metadata = client.get_server_metadata()
    assert metadata.name == "bitmoji-serve"
    assert metadata.version  # the package's version
    assert list(metadata.extensions) == ["model_repository"]


def test_model_metadata_describes_every_input_and_output(client, loaded):
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "pytorch_torchscript"
    tensors = lambda key: [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata[key]]  # noqa: E731
    assert tensors("inputs") == [("image", "FP32", [-1, 3, 128, 128]), ("image_bytes", "BYTES", [-1])]
    assert tensors("outputs") == [
        ("logits", "FP32", [-1, 1]),
        ("probabilities", "FP32", [-1, 1]),
        ("labels", "BYTES", [-1, 1]),
    ]


def test_reflection_lists_the_service(channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert KSERVE in ProtoReflectionDescriptorDatabase(channel).get_services()


# -- inference equals Classify ----------------------------------------------------------------


def test_fp32_inference_equals_classify(client, classify):
    images = synthetic_images(5, seed=11)
    x = preprocessed(images)
    result = infer(client, fp32_input(x), request_id="req-7")
    assert result.get_response().id == "req-7"
    assert result.get_response().model_name == MODEL
    # Classify on the same preprocessed tensors, and on the images themselves (the server preprocesses)
    assert_equals_classify(result, classify([tensor_input(torch.from_numpy(item)) for item in x]))
    assert_equals_classify(result, classify([image_input(b) for b in images]))


def test_bytes_inference_equals_classify(client, classify):
    images = synthetic_images(6, seed=12)  # PNG, JPEG, RGBA, palette, odd sizes: preprocessed by the server
    result = infer(client, bytes_input(images))
    assert_equals_classify(result, classify([image_input(b) for b in images]))


def test_requested_outputs_only(client, classify):
    images = synthetic_images(2, seed=13)
    result = infer(client, bytes_input(images), outputs=[triton.InferRequestedOutput("probabilities")])
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    assert result.as_numpy("logits") is None and result.as_numpy("labels") is None
    expected = [p.probability for p in classify([image_input(b) for b in images]).predictions]
    np.testing.assert_allclose(result.as_numpy("probabilities")[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_typed_contents_equal_raw_contents(channel, client):
    """`contents.fp32_contents` (what JSON-minded clients send) instead of raw bytes: the same answer."""
    x = preprocessed(synthetic_images(2, seed=14))
    request = tpb.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    outputs = zip(response.outputs, response.raw_output_contents, strict=True)
    by_name = {o.name: np.frombuffer(raw, "<f4") for o, raw in outputs if o.datatype == "FP32"}
    expected = infer(client, fp32_input(x))
    np.testing.assert_array_equal(by_name["logits"], expected.as_numpy("logits")[:, 0])
    np.testing.assert_array_equal(by_name["probabilities"], expected.as_numpy("probabilities")[:, 0])


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, words",
    [
        (
            lambda: fp32_input(np.zeros((1, 3, 128, 128), np.float32), name="pixels"),
            ["unknown input 'pixels'", "image", "image_bytes"],
        ),
        (lambda: fp32_input(np.zeros((1, 3, 64, 64), np.float32)), ["shape [1, 3, 64, 64]", "[-1, 3, 128, 128]"]),
        (lambda: fp32_input(np.zeros((3, 128, 128), np.float32)), ["shape [3, 128, 128]"]),
        (lambda: _typed(np.zeros((1, 3, 128, 128), np.float64), "FP64"), ["datatype FP64", "FP32"]),
        (lambda: bytes_input([b"not an image"]), ["image_bytes[0]"]),
        (lambda: fp32_input(np.full((1, 3, 128, 128), np.nan, np.float32)), ["image[0]", "NaN"]),
        (lambda: bytes_input(synthetic_images(17, seed=15)), ["too many inputs: 17", "16"]),
    ],
    ids=["name", "shape", "no-batch-dim", "datatype", "undecodable", "nan", "too-many"],
)
def test_bad_inputs_are_invalid_argument(client, make, words):
    error = refused(infer, client, make())
    assert error.status() == "StatusCode.INVALID_ARGUMENT", error
    for word in words:
        assert word in error.message(), error.message()


def _typed(array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput("image", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_unknown_output_is_invalid_argument(client):
    error = refused(infer, client, bytes_input(synthetic_images(1)), outputs=[triton.InferRequestedOutput("embedding")])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "unknown output 'embedding'" in error.message()


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda r: r.raw_input_contents.append(b"\0" * 4), ["needs 196608"]),  # one float for a [1, 3, 128, 128] tensor
        (lambda r: r.raw_input_contents.extend([b"\0" * 196608, b""]), ["2 entries for 1 input"]),
        (
            lambda r: (r.inputs[0].contents.fp32_contents.append(0.0), r.raw_input_contents.append(b"\0" * 196608)),
            ["not both"],
        ),
        (lambda r: r.inputs[0].contents.fp32_contents.extend([0.0] * 10), ["10 values"]),
    ],
    ids=["raw-size", "raw-count", "both", "contents-size"],
)
def test_contents_that_contradict_the_shape_are_invalid_argument(channel, build, words):
    request = tpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 128, 128])
    build(request)
    with pytest.raises(grpc.RpcError) as info:
        tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in info.value.details(), info.value.details()


def test_bad_raw_bytes_framing_is_invalid_argument(channel):
    request = tpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    request.raw_input_contents.append((100).to_bytes(4, "little") + b"short")
    with pytest.raises(grpc.RpcError) as info:
        tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "says 100 bytes" in info.value.details()


# -- the same batcher, the same metrics -------------------------------------------------------


def test_metrics_count_kserve_calls_and_items(server, client):
    before = scrape(server)
    infer(client, bytes_input(synthetic_images(3, seed=16)))
    refused(infer, client, bytes_input([b"junk"]))
    client.is_server_ready()
    after = scrape(server)
    delta = lambda name, **labels: total(after, name, **labels) - total(before, name, **labels)  # noqa: E731
    assert delta("bitmoji_requests_total", method="ModelInfer", code="OK", model=MODEL, version="1") == 1
    assert delta("bitmoji_requests_total", method="ModelInfer", code="INVALID_ARGUMENT") == 1
    assert delta("bitmoji_requests_total", method="ServerReady", code="OK") == 1
    assert delta("bitmoji_items_total") == 3  # the dynamic batcher ran them, like Classify's
    assert delta("bitmoji_serialization_duration_seconds_count", method="ModelInfer", direction="request") == 2
    assert delta("bitmoji_serialization_duration_seconds_count", method="ModelInfer", direction="response") == 1


def test_model_name_flag_defaults_to_bitmoji(monkeypatch):
    assert parse_config(["--model", "m.pt"], environ={}).model_name == "bitmoji"
    assert parse_config(["--model", "m.pt"], environ={"BITMOJI_MODEL_NAME": "eva"}).model_name == "eva"
    with pytest.raises(SystemExit):
        parse_config(["--model", "m.pt", "--model-name", ""], environ={})
