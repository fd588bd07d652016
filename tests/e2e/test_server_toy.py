"""The server on the lecture's toy network (a TorchScript file with no metadata): raw tensors only,
the lecture's hand-computed gradients through GradientProbe, and the health life cycle
NOT_SERVING -> SERVING -> NOT_SERVING watched from before the server is up until it exits.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import free_port, from_proto, image_input, rpc_error, start_server, synthetic_images, tensor_input

from bitmoji.core.modelfile import load_model
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LECTURE_GRADIENTS = {  # x = 1, target 3, MSE
    "hidden.weight": [[-0.3480], [-1.3032]],
    "hidden.bias": [-0.3480, -1.3032],
    "output.weight": [[-2.9191, -2.4229]],
    "output.bias": [-3.3142],
}


class HealthWatcher(threading.Thread):
    """Records every status a health Watch stream reports, from before the server listens until it goes away."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        self.target = target
        self.statuses: list[int] = []
        self.changed = threading.Condition()

    def run(self):
        # retry the connection often: the server opens its port only after its imports
        options = [
            ("grpc.initial_reconnect_backoff_ms", 50),
            ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 100),
        ]
        with grpc.insecure_channel(self.target, options=options) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), wait_for_ready=True, timeout=120
            )
            try:
                for response in stream:
                    with self.changed:
                        self.statuses.append(response.status)
                        self.changed.notify_all()
            except grpc.RpcError:
                pass

    def wait_for(self, status: int, timeout: float = 30) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: status in self.statuses, timeout), (
                f"never saw {status}: {self.statuses}"
            )


@pytest.fixture(scope="module")
def toy(toy_model_file):
    port = free_port()
    watcher = HealthWatcher(f"127.0.0.1:{port}")
    watcher.start()
    server = start_server(toy_model_file, "--port", str(port), "--warmup-delay-s", "1.5")
    server.watcher = watcher
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="module")
def toy_stub(toy):
    with grpc.insecure_channel(toy.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


def test_health_is_not_serving_until_warm_then_serving(toy):
    toy.watcher.wait_for(SERVING)
    assert toy.watcher.statuses[:2] == [NOT_SERVING, SERVING]


def test_gradient_probe_reproduces_the_lectures_hand_computed_gradients(toy_stub):
    request = pb.GradientProbeRequest(
        inputs=[tensor_input(torch.tensor([1.0]))], targets=[3.0], loss=pb.LOSS_MSE, include_values=True
    )
    response = toy_stub.GradientProbe(request, timeout=30)
    got = {p.name: from_proto(p.values) for p in response.parameters}
    assert set(got) == set(LECTURE_GRADIENTS)
    for name, expected in LECTURE_GRADIENTS.items():
        torch.testing.assert_close(got[name], torch.tensor(expected), atol=1e-4, rtol=0)
        parameter = next(p for p in response.parameters if p.name == name)
        assert parameter.norm == pytest.approx(float(torch.tensor(expected).norm()), abs=1e-4)
        assert parameter.max_abs == pytest.approx(float(torch.tensor(expected).abs().max()), abs=1e-4)
    assert from_proto(response.outputs).item() == pytest.approx(1.3429, abs=1e-4)
    assert response.loss == pytest.approx((1.3429 - 3) ** 2, abs=1e-3)
    assert list(response.input_gradients[0].gradient.shape) == [1]
    assert response.input_gradients[0].saliency_png == b""  # not an image


def test_gradient_probe_without_a_loss_is_refused_for_a_model_without_classes(toy_stub):
    request = pb.GradientProbeRequest(inputs=[tensor_input(torch.tensor([1.0]))], targets=[3.0])
    error = rpc_error(toy_stub.GradientProbe, request, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "LOSS_MSE" in error.details()


def test_classify_raw_tensors_on_a_model_without_metadata(toy_stub, toy_model_file):
    module = load_model(toy_model_file).module
    xs = torch.tensor([[1.0], [0.5], [-2.0]])
    response = toy_stub.Classify(pb.ClassifyRequest(inputs=[tensor_input(x) for x in xs]), timeout=30)
    with torch.inference_mode():
        expected = module(xs).reshape(-1).tolist()
    assert [p.logit for p in response.predictions] == pytest.approx(expected, abs=1e-6)
    assert all(p.label == "" for p in response.predictions)
    assert response.model_version == "1" and response.model_build.startswith("sha256-")


def test_images_are_refused_by_a_model_without_image_preprocessing(toy_stub):
    error = rpc_error(toy_stub.Classify, pb.ClassifyRequest(inputs=[image_input(synthetic_images(1)[0])]), timeout=30)
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs[0]: this model takes no images" in error.details()
    )


def test_model_info_without_metadata(toy_stub):
    info = toy_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.metadata_json == "{}" and not info.class_names and not info.input_shape and info.architecture == ""
    assert info.model_build.startswith("sha256-") and len(info.model_sha256) == 64


def test_sigterm_reports_not_serving_and_exits_0(toy):
    """Runs last in this module: it stops the module's server."""
    toy.watcher.wait_for(SERVING)
    started = time.monotonic()
    assert toy.stop() == 0, toy.output()
    toy.watcher.join(10)
    assert toy.watcher.statuses[-1] == NOT_SERVING, toy.watcher.statuses
    assert "stopped" in toy.output()
    assert time.monotonic() - started < 5  # the open Watch stream does not hold the exit for the grace period
