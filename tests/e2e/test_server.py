"""The gRPC server, end to end: a real `python -m bitmoji.server` subprocess on the CNN model, real gRPC,
generated stubs.

One server process serves the whole module (starting one costs seconds);
tests that count metrics compare scrapes taken before and after their calls.
The server serves one file (`--model`): model `bitmoji`, version 1.
"""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from helpers import (
    expected_logits,
    from_proto,
    health_status,
    image_input,
    rpc_error,
    sample,
    scrape,
    start_server,
    synthetic_images,
    tensor_input,
    total,
)
from PIL import Image

from bitmoji.core.gradients import gradient_probe
from bitmoji.core.modelfile import load_model
from bitmoji.core.preprocess import load_image, to_model_input
from bitmoji.server.saliency import figure_size
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- the CNN server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn(cnn_model_file):
    # --optimize on: every test here runs Classify on the frozen, optimized copy, and GradientProbe on the module
    # as loaded
    server = start_server(
        cnn_model_file,
        "--max-batch-delay-ms",
        "20",
        "--max-items-per-call",
        "64",
        "--max-probe-inputs",
        "4",
        "--optimize",
        "on",
    )
    yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def cnn_channel(cnn):
    with grpc.insecure_channel(cnn.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(cnn_channel):
    return pb_grpc.ClassifierStub(cnn_channel)


@pytest.fixture(scope="module")
def cnn_loaded(cnn_model_file):
    return load_model(cnn_model_file)


def _expected_predictions(loaded, images: list[bytes]) -> list[float]:
    return expected_logits(loaded.module, to_model_input(torch.stack([load_image(b) for b in images])))


def _assert_predictions(response, logits: list[float], loaded):
    assert (response.model_name, response.model_version, response.model_build) == ("bitmoji", "1", loaded.version)
    assert len(response.predictions) == len(logits)
    positive = loaded.positive_class
    negative = next(n for n in loaded.class_names if n != positive)
    for got, want in zip(response.predictions, logits, strict=True):
        assert got.logit == pytest.approx(want, abs=1e-4, rel=1e-4)
        assert got.probability == pytest.approx(1 / (1 + np.exp(-want)), abs=1e-5)
        if abs(want) > 1e-3:
            assert got.label == (positive if want > 0 else negative)


def test_image_predictions_equal_in_process_torchscript(stub, cnn_loaded):
    images = synthetic_images(8)
    response = stub.Classify(pb.ClassifyRequest(inputs=[image_input(b) for b in images]), timeout=30)
    _assert_predictions(response, _expected_predictions(cnn_loaded, images), cnn_loaded)


@pytest.mark.real_data
def test_real_images_predictions_equal_in_process_torchscript(stub, cnn_loaded, real_data):
    paths = (
        sorted((real_data / "valid" / "tom").glob("*.png"))[:3]
        + sorted((real_data / "valid" / "not_tom").glob("*.png"))[:3]
    )
    paths += sorted((real_data / "unseen").iterdir())
    images = [p.read_bytes() for p in paths if p.is_file()]
    response = stub.Classify(pb.ClassifyRequest(inputs=[image_input(b) for b in images]), timeout=30)
    _assert_predictions(response, _expected_predictions(cnn_loaded, images), cnn_loaded)


def test_raw_tensor_predictions_equal_in_process_torchscript(stub, cnn_loaded):
    images = [load_image(b) for b in synthetic_images(4, seed=1)]
    floats = to_model_input(torch.stack(images))
    inputs = [
        tensor_input(floats[0], pb.DATA_TYPE_FLOAT32),
        tensor_input(images[1], pb.DATA_TYPE_UINT8),  # scaled by 1/255 like an image
        tensor_input(floats[2], pb.DATA_TYPE_FLOAT64),
        tensor_input(floats[3], pb.DATA_TYPE_FLOAT16),
    ]
    expected_inputs = floats.clone()
    expected_inputs[3] = floats[3].half().float()
    response = stub.Classify(pb.ClassifyRequest(inputs=inputs), timeout=30)
    _assert_predictions(response, expected_logits(cnn_loaded.module, expected_inputs), cnn_loaded)
    # one call mixing image bytes and tensors (one batch, mixed dtypes) answers in request order
    mixed = stub.Classify(
        pb.ClassifyRequest(inputs=[inputs[1], image_input(synthetic_images(1, seed=1)[0]), inputs[0]]), timeout=30
    )
    assert [p.logit for p in mixed.predictions] == pytest.approx(
        [response.predictions[i].logit for i in (1, 0, 0)], abs=1e-4
    )


def test_concurrent_calls_are_batched_and_each_caller_gets_its_own_answers(cnn, stub, cnn_loaded):
    threads, calls_each = 16, 3
    images = synthetic_images(threads * calls_each, seed=2)
    expected = _expected_predictions(cnn_loaded, images)
    before = scrape(cnn)
    barrier = threading.Barrier(threads)

    def caller(t: int) -> list[tuple[int, float]]:
        barrier.wait()
        got = []
        for c in range(calls_each):
            i = t * calls_each + c
            response = stub.Classify(pb.ClassifyRequest(inputs=[image_input(images[i])]), timeout=30)
            got.append((i, response.predictions[0].logit))
        return got

    with ThreadPoolExecutor(threads) as pool:
        results = [r for rs in pool.map(caller, range(threads)) for r in rs]
    for i, logit in results:
        assert logit == pytest.approx(expected[i], abs=1e-4, rel=1e-4), f"caller of image {i} got another's answer"
    after = scrape(cnn)
    batches = total(after, "bitmoji_batch_size_count") - total(before, "bitmoji_batch_size_count")
    items = total(after, "bitmoji_batch_size_sum") - total(before, "bitmoji_batch_size_sum")
    singles = total(after, "bitmoji_batch_size_bucket", le="1.0") - total(before, "bitmoji_batch_size_bucket", le="1.0")
    assert items == threads * calls_each
    assert batches < items and singles < batches, f"{items} items in {batches} batches ({singles} of one): no batching"


def test_stream_classify_answers_each_message_in_order(stub, cnn_loaded):
    images = synthetic_images(9, seed=3)
    groups = [images[0:1], images[1:4], images[4:5], images[5:7], images[7:9]]
    requests = [pb.ClassifyRequest(inputs=[image_input(b) for b in group]) for group in groups]
    responses = list(stub.StreamClassify(iter(requests), timeout=30))
    assert len(responses) == len(groups)
    for response, group in zip(responses, groups, strict=True):
        _assert_predictions(response, _expected_predictions(cnn_loaded, group), cnn_loaded)


def test_stream_classify_ends_with_the_status_of_a_bad_message(stub):
    good = pb.ClassifyRequest(inputs=[image_input(synthetic_images(1)[0])])
    stream = stub.StreamClassify(iter([good, pb.ClassifyRequest(), good]), timeout=30)
    assert len(next(stream).predictions) == 1
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == INVALID and "empty request" in info.value.details()


def _bad_requests() -> dict[str, tuple[pb.ClassifyRequest, str]]:
    good = synthetic_images(1)[0]
    x = torch.rand(3, 128, 128)
    wrong_length = tensor_input(x)
    wrong_length.tensor.data = wrong_length.tensor.data[:-4]
    nan = x.clone()
    nan[0, 5, 5] = float("nan")
    no_dtype = tensor_input(x)
    no_dtype.tensor.dtype = pb.DATA_TYPE_UNSPECIFIED

    def call(*inputs):
        return pb.ClassifyRequest(inputs=list(inputs))

    return {
        "corrupt image": (
            call(image_input(good), image_input(good[: len(good) // 2])),
            "inputs[1]: corrupt or truncated image",
        ),
        "zero bytes": (call(image_input(b"")), "inputs[0]: empty image (0 bytes)"),
        "not an image": (
            call(image_input(good), image_input(good), image_input(b"GIF? no, text")),
            "inputs[2]: not an image",
        ),
        "empty request": (call(), "empty request"),
        "empty input": (call(pb.Input()), "inputs[0]: empty input"),
        "wrong shape": (
            call(tensor_input(torch.rand(3, 64, 64))),
            "inputs[0]: tensor shape [3, 64, 64] does not match",
        ),
        "no dtype": (call(no_dtype), "inputs[0]: unsupported tensor dtype DATA_TYPE_UNSPECIFIED"),
        "wrong byte length": (call(tensor_input(x), wrong_length), "inputs[1]: tensor data has 196604 bytes"),
        "NaN": (call(tensor_input(nan)), "inputs[0]: tensor contains NaN"),
        "too many items": (call(*[image_input(b"x")] * 65), "too many inputs: 65; at most 64"),
    }


def test_malformed_inputs_get_invalid_argument_naming_the_item_and_the_server_keeps_serving(cnn, stub, cnn_channel):
    before = scrape(cnn)
    bad = _bad_requests()
    for what, (request, message) in bad.items():
        error = rpc_error(stub.Classify, request, timeout=30)
        assert error.code() == INVALID, f"{what}: {error.code()} {error.details()}"
        assert message in error.details(), f"{what}: {error.details()!r}"
    assert health_status(cnn_channel) == health_pb2.HealthCheckResponse.SERVING
    assert (
        len(stub.Classify(pb.ClassifyRequest(inputs=[image_input(synthetic_images(1)[0])]), timeout=30).predictions)
        == 1
    )
    after = scrape(cnn)
    delta = total(after, "bitmoji_requests_total", method="Classify", code="INVALID_ARGUMENT") - total(
        before, "bitmoji_requests_total", method="Classify", code="INVALID_ARGUMENT"
    )
    assert delta == len(bad)
    # nothing that was refused is still counted as queued
    assert total(after, "bitmoji_queue_depth") == 0


def test_metrics_count_calls_by_method_and_code(cnn, stub):
    before = scrape(cnn)
    images = synthetic_images(3, seed=4)
    for b in images:
        stub.Classify(pb.ClassifyRequest(inputs=[image_input(b), image_input(b)]), timeout=30)
    rpc_error(stub.Classify, pb.ClassifyRequest(), timeout=30)
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    after = scrape(cnn)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    version = {"model": "bitmoji", "version": "1"}
    assert delta("bitmoji_requests_total", method="Classify", code="OK", **version) == 3
    # refused before a model version was chosen: no model labels
    assert delta("bitmoji_requests_total", method="Classify", code="INVALID_ARGUMENT", model="", version="") == 1
    assert delta("bitmoji_requests_total", method="GetModelInfo", code="OK", **version) == 1
    assert delta("bitmoji_request_duration_seconds_count", method="Classify") == 4
    assert delta("bitmoji_items_total", **version) == 6
    assert delta("bitmoji_items_total") == 6
    assert delta("bitmoji_preprocess_duration_seconds_count") == 6
    assert delta("bitmoji_queue_wait_seconds_count") == 6
    assert delta("bitmoji_forward_duration_seconds_count") >= 3
    # every request is parsed (the empty one too); only answered calls serialise a response
    assert delta("bitmoji_serialization_duration_seconds_count", method="Classify", direction="request") == 4
    assert delta("bitmoji_serialization_duration_seconds_count", method="Classify", direction="response") == 3
    assert delta("bitmoji_serialization_duration_seconds_count", method="GetModelInfo", direction="response") == 1
    assert delta("bitmoji_serialization_duration_seconds_sum", method="Classify", direction="request") > 0
    assert sample(after, "bitmoji_torch_threads") >= 1
    assert sample(after, "bitmoji_inflight_requests") == 0
    info = [dict(labels) for (name, labels), value in after.items() if name == "bitmoji_model_info" and value == 1]
    assert len(info) == 1 and info[0]["device"] == "cpu" and info[0]["architecture"] == "cnn"
    assert (info[0]["model"], info[0]["version"]) == ("bitmoji", "1")
    assert delta("bitmoji_items_dropped_total", reason="cancelled") == 0
    # the process and build metrics a dashboard needs, on a plain server
    assert sample(after, "process_resident_memory_bytes") > 0 and sample(after, "process_open_fds") > 0
    assert total(after, "bitmoji_build_info") == 1 and sample(after, "bitmoji_serving") == 1


def test_the_cnn_server_says_which_forward_module_classify_runs(cnn, stub):
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)  # served: the start-up log is complete
    assert "Classify's forward pass: optimized (--optimize on; logits within" in cnn.output()


def test_get_model_info(stub, cnn_loaded):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert (info.model_name, info.model_version, info.model_build) == ("bitmoji", "1", cnn_loaded.version)
    assert [(v.version, v.state) for v in info.status.versions] == [("1", pb.MODEL_STATE_READY)]
    assert info.status.default_version == "1" and info.status.versions[0].memory_bytes > 0
    assert info.architecture == "cnn"
    assert list(info.class_names) == cnn_loaded.class_names
    assert info.positive_class == cnn_loaded.positive_class
    assert list(info.input_shape) == [3, 128, 128]
    assert json.loads(info.metadata_json) == cnn_loaded.metadata
    assert info.device == "cpu"
    assert (info.max_batch_size, info.max_batch_delay_ms, info.max_items_per_call) == (32, 20.0, 64)
    assert info.torch_threads >= 1
    assert info.gradient_probe_enabled
    assert info.model_sha256 == cnn_loaded.sha256


def test_reflection_lists_the_services(cnn_channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    services = ProtoReflectionDescriptorDatabase(cnn_channel).get_services()
    assert "bitmoji.v1.Classifier" in services and "grpc.health.v1.Health" in services


def test_health_serving_for_the_server_the_services_and_the_model(cnn_channel):
    for service in ("", "bitmoji.v1.Classifier", "bitmoji.v1.ModelRepository", "bitmoji.v1.Classifier/bitmoji"):
        assert health_status(cnn_channel, service) == health_pb2.HealthCheckResponse.SERVING, service
    assert rpc_error(health_status, cnn_channel, "bitmoji.v1.Classifier/nope").code() == grpc.StatusCode.NOT_FOUND


def test_unknown_method_is_unimplemented(cnn_channel):
    call = cnn_channel.unary_unary(
        "/bitmoji.v1.Classifier/Nope", request_serializer=lambda _: b"", response_deserializer=bytes
    )
    assert rpc_error(call, None, timeout=10).code() == grpc.StatusCode.UNIMPLEMENTED


def test_gradient_probe_on_the_cnn_equals_in_process_autograd(stub, cnn_loaded):
    images = synthetic_images(2, seed=5)
    request = pb.GradientProbeRequest(
        inputs=[image_input(b) for b in images],
        targets=[1.0, 0.0],
        loss=pb.LOSS_BCE,
        include_values=True,
        include_saliency_png=True,
    )
    response = stub.GradientProbe(request, timeout=60)
    x = to_model_input(torch.stack([load_image(b) for b in images]))
    want = gradient_probe(cnn_loaded.module, x, torch.tensor([1.0, 0.0]), "bce")
    assert (response.model_name, response.model_version, response.model_build) == ("bitmoji", "1", cnn_loaded.version)
    assert response.loss == pytest.approx(want.loss, rel=1e-5)
    torch.testing.assert_close(from_proto(response.outputs), want.outputs, atol=1e-5, rtol=1e-5)
    assert [p.name for p in response.parameters] == [p.name for p in want.parameters]
    for got, expected in zip(response.parameters, want.parameters, strict=True):
        assert list(got.shape) == list(expected.gradient.shape)
        torch.testing.assert_close(from_proto(got.values), expected.gradient, atol=1e-6, rtol=1e-4)
        assert got.norm == pytest.approx(expected.norm, rel=1e-4, abs=1e-9)
        assert got.max_abs == pytest.approx(expected.max_abs, rel=1e-4, abs=1e-9)
        assert got.mean_abs == pytest.approx(expected.mean_abs, rel=1e-4, abs=1e-9)
    assert len(response.input_gradients) == 2
    for i, item in enumerate(response.input_gradients):
        torch.testing.assert_close(from_proto(item.gradient), want.input_gradient[i], atol=1e-7, rtol=1e-4)
        with Image.open(io.BytesIO(item.saliency_png)) as heat_map:
            assert heat_map.format == "PNG" and heat_map.size == figure_size(128, 128)
    # the classifier's default loss is bce; without include_values no values travel
    default = stub.GradientProbe(pb.GradientProbeRequest(inputs=request.inputs, targets=[1.0, 0.0]), timeout=60)
    assert default.loss == pytest.approx(response.loss, rel=1e-6)
    assert not any(p.HasField("values") for p in default.parameters)
    assert not any(g.saliency_png for g in default.input_gradients)


def test_gradient_probe_refuses_bad_requests(stub):
    image = image_input(synthetic_images(1)[0])
    cases = {
        "wrong number of targets": (pb.GradientProbeRequest(inputs=[image], targets=[1.0, 0.0]), "targets"),
        "bce target out of range": (pb.GradientProbeRequest(inputs=[image], targets=[2.0], loss=pb.LOSS_BCE), "[0, 1]"),
        "too many inputs": (pb.GradientProbeRequest(inputs=[image] * 5, targets=[1.0] * 5), "at most 4"),
        "no inputs": (pb.GradientProbeRequest(), "empty request"),
        "unknown loss": (pb.GradientProbeRequest(inputs=[image], targets=[1.0], loss=7), "unknown loss"),
        "corrupt image": (
            pb.GradientProbeRequest(inputs=[image, image_input(b"junk")], targets=[1.0, 0.0]),
            "inputs[1]",
        ),
    }
    for what, (request, message) in cases.items():
        error = rpc_error(stub.GradientProbe, request, timeout=30)
        assert error.code() == INVALID and message in error.details(), f"{what}: {error.code()} {error.details()}"
