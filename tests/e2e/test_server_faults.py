"""Overload, time and faults, on a model built to be slow or to fail on demand.

The model takes raw tensors [2]: column 0 is its logit; column 1 > 0 makes its
forward pass spin the CPU (calibrated to about SLOW_S seconds), < 0 makes it
raise. With batches of one item and a queue of two, the tests can hold the
model thread busy and look at what queues behind it.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from helpers import (
    export_faulty_model,
    health_status,
    rows_request,
    rpc_error,
    scrape,
    start_server,
    tensor_input,
    total,
    wait_until,
)

from bitmoji.core import modelfile
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

SLOW_S = 0.8
request = rows_request


def running_alone(samples) -> bool:
    """One call in flight and nothing queued: its item is in the model."""
    return total(samples, "bitmoji_inflight_requests") == 1 and total(samples, "bitmoji_queue_depth") == 0


def wait_for_shutdown(channel, timeout: float = 10) -> None:
    """Until health says NOT_SERVING or the server refuses calls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
        except grpc.RpcError:
            return
        time.sleep(0.01)
    raise AssertionError("the server never started shutting down")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    path = export_faulty_model(tmp_path_factory.mktemp("models") / "faulty.pt")
    module = modelfile.load_model(path).module
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server will run it
    try:
        started = time.perf_counter()
        module(torch.tensor([[0.0, 2000.0]]))
        iterations = int(2000 * SLOW_S / (time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)
    server = start_server(
        path,
        "--max-batch-size",
        "1",
        "--max-queue",
        "2",
        "--max-items-per-call",
        "2",
        "--max-batch-delay-ms",
        "0",
        "--torch-threads",
        "1",
        "--decode-workers",
        "1",
        "--disable-gradient-probe",
    )
    server.iterations = iterations
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="module")
def channel(faulty):
    with grpc.insecure_channel(faulty.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.ClassifierStub(channel)


def test_queue_full_gets_resource_exhausted_at_once_and_accepted_calls_are_served(faulty, stub):
    slow = [1.0, faulty.iterations]
    accepted = stub.Classify.future(request(slow, slow), timeout=30)
    # first item in the model, the second queued: one place left, the next call needs two
    wait_until(faulty, lambda s: total(s, "bitmoji_queue_depth") == 1 and total(s, "bitmoji_inflight_requests") == 1)
    started = time.monotonic()
    error = rpc_error(stub.Classify, request([0.5, 0], [0.5, 0]), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in error.details()
    assert time.monotonic() - started < SLOW_S / 2, "refused only after waiting"
    assert [p.logit for p in accepted.result().predictions] == [1.0, 1.0]
    assert [p.logit for p in stub.Classify(request([0.5, 0], [0.25, 0]), timeout=30).predictions] == [0.5, 0.25]


def test_items_of_expired_and_cancelled_calls_are_dropped_before_the_model(faulty, stub):
    before = scrape(faulty)
    blocker = stub.Classify.future(request([1.0, faulty.iterations]), timeout=30)
    wait_until(faulty, running_alone)
    expiring = stub.Classify.future(request([0.5, 0]), timeout=SLOW_S * 0.4)
    cancelled = stub.Classify.future(request([0.5, 0]), timeout=30)
    wait_until(faulty, lambda s: total(s, "bitmoji_queue_depth") == 2)
    cancelled.cancel()
    assert expiring.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert blocker.result().model_build == "faulty-1"

    def delta(samples, name, **labels):
        return total(samples, name, **labels) - total(before, name, **labels)

    after = wait_until(
        faulty,
        lambda s: (
            delta(s, "bitmoji_items_dropped_total", reason="deadline") == 1
            and delta(s, "bitmoji_items_dropped_total", reason="cancelled") == 1
        ),
    )
    assert delta(after, "bitmoji_items_total") == 1  # only the blocker reached the model
    assert delta(after, "bitmoji_requests_total", method="Classify", code="DEADLINE_EXCEEDED") == 1
    assert delta(after, "bitmoji_requests_total", method="Classify", code="CANCELLED") == 1


def test_forward_exception_fails_only_its_batch_and_the_server_keeps_serving(faulty, stub, channel):
    failing = stub.Classify.future(request([0.5, -1]), timeout=30)
    fine = stub.Classify.future(request([0.25, 0]), timeout=30)
    error = failing.exception()
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "model forward failed" in error.details() and "injected fault" in error.details()
    assert fine.result().predictions[0].logit == 0.25
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert stub.Classify(request([0.75, 0]), timeout=30).predictions[0].logit == 0.75
    assert "injected fault" in faulty.output()  # logged once, with the reason


def test_disabled_gradient_probe_is_unimplemented(stub):
    error = rpc_error(
        stub.GradientProbe,
        pb.GradientProbeRequest(inputs=[tensor_input(torch.tensor([1.0, 0.0]))], targets=[1.0]),
        timeout=30,
    )
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED and "disabled" in error.details()
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).gradient_probe_enabled is False


def test_sigterm_finishes_accepted_calls_refuses_new_ones_and_exits_0(faulty, stub, channel):
    """Runs last in this module: it stops the module's server."""
    before = scrape(faulty)
    accepted = stub.Classify.future(request([1.0, faulty.iterations]), timeout=30)
    wait_until(faulty, running_alone)
    faulty.proc.send_signal(signal.SIGTERM)
    wait_for_shutdown(channel)
    refused = rpc_error(stub.Classify, request([0.5, 0]), timeout=10)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE, (refused.code(), refused.details())
    assert "shutting down" in refused.details()  # refused by the drain, not cut by grpc
    after = scrape(faulty)
    assert (
        total(after, "bitmoji_refusals_total", reason="shutdown")
        - total(before, "bitmoji_refusals_total", reason="shutdown")
        == 1
    )
    assert accepted.result().predictions[0].logit == 1.0
    assert faulty.proc.wait(30) == 0, faulty.output()
    assert "stopped" in faulty.output()
