"""Overload, faults and time under load: a bounded load test with more callers than the queue holds,
a client disconnecting from a batch mid-forward, SIGTERM while under load, and model hot reload
with traffic running.

test_server_faults.py proves the single-call versions (queue full at once, expired and cancelled
items dropped, a forward exception failing only its batch, SIGTERM with one call in flight); these
tests put many callers on top. The slow model is test_server_faults.py's: column 1 of each item
sets how long its batch's forward spins.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections import Counter

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    export_faulty_model,
    export_test_model,
    image_input,
    rows_request,
    rss_bytes,
    sample,
    scrape,
    small_image,
    start_server,
    total,
    wait_until,
)
from torch import nn

from bitmoji.core import modelfile
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK
request = rows_request


def running_alone(samples) -> bool:
    """One call in flight and nothing queued: its item is in the model."""
    return total(samples, "bitmoji_inflight_requests") == 1 and total(samples, "bitmoji_queue_depth") == 0


def calibrate(module, seconds: float) -> int:
    """Iterations of FaultyNet's loop that take about `seconds` on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(3):  # the fastest of three: a busy machine only ever makes a call longer than asked
            started = time.perf_counter()
            module(torch.tensor([[0.0, 20000.0]]))
            best = min(best, time.perf_counter() - started)
        return max(1, int(20000 * seconds / best))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    path = export_faulty_model(tmp_path_factory.mktemp("models") / "slow.pt", "slow-1")
    return path, calibrate(modelfile.load_model(path).module, 0.001)  # iterations per millisecond


@pytest.fixture(scope="module")
def slow(slow_model):
    """Batches of up to 4 items, a queue of 8, one item per call: 64 callers overflow it.
    Stopped by the module's last test.
    """
    path, _ = slow_model
    server = start_server(
        path,
        "--max-batch-size",
        "4",
        "--max-queue",
        "8",
        "--max-items-per-call",
        "1",
        "--max-batch-delay-ms",
        "0",
        "--torch-threads",
        "1",
        "--decode-workers",
        "1",
        "--disable-gradient-probe",
        "--grace-period-s",
        "0.5",
    )
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


def ms(slow_model, milliseconds: float) -> float:
    """Column 1 value that makes a batch's forward spin about `milliseconds`."""
    return float(int(slow_model[1] * milliseconds))


# -- overload --------------------------------------------------------------------------


async def _load(target: str, callers: int, seconds: float, row, max_calls: int) -> Counter:
    """`callers` concurrent loops of one-item Classify calls for `seconds`; every outcome counted."""
    outcomes: Counter = Counter()
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    stop_at = time.monotonic() + seconds
    try:

        async def caller(i: int):
            stub = pb_grpc.ClassifierStub(channels[i % len(channels)])
            for _ in range(max_calls):
                if time.monotonic() >= stop_at:
                    return
                try:
                    response = await stub.Classify(request(row), timeout=20)
                    assert response.predictions[0].logit == pytest.approx(row[0])
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[error.code().name] += 1
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.002)  # a polite client backs off; still far more than the queue

        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(callers))), seconds + 30)
    finally:
        for channel in channels:
            await channel.close()
    return outcomes


def test_more_callers_than_the_queue_holds_get_ok_or_resource_exhausted_and_memory_stays_flat(slow, slow_model):
    row = [0.25, ms(slow_model, 2)]  # 2 ms per batch of 4: the model, not the callers, is the bottleneck
    asyncio.run(_load(slow.target, 64, 1.0, row, 10_000))  # warm-up: threads, channels and allocator arenas settle
    before = rss_bytes(slow.proc.pid)
    started = time.monotonic()
    outcomes = asyncio.run(_load(slow.target, 64, 4.0, row, 10_000))
    took = time.monotonic() - started
    after = rss_bytes(slow.proc.pid)
    print(
        f"\nload: 64 callers, 4 s: {dict(outcomes)} in {took:.1f} s; "
        f"server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
    )
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["OK"] > 100 and outcomes["RESOURCE_EXHAUSTED"] > 0, outcomes  # really overloaded, still serving
    assert took < 4.0 + 10, "calls hung"
    assert after - before < 64 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MiB"
    samples = wait_until(slow, lambda s: sample(s, "bitmoji_inflight_requests") == 0)
    assert total(samples, "bitmoji_queue_depth") == 0


# -- a client that disconnects mid-batch -------------------------------------------------


def test_a_client_that_disconnects_mid_batch_does_not_disturb_the_rest_of_its_batch(slow, slow_model):
    stub = pb_grpc.ClassifierStub(grpc.insecure_channel(slow.target))
    before = scrape(slow)
    for phase in ("in the forward pass", "while queued"):
        blocker = stub.Classify.future(request([1.0, ms(slow_model, 600)]), timeout=30)
        wait_until(slow, running_alone)
        victim_channel = grpc.insecure_channel(slow.target)
        victim = pb_grpc.ClassifierStub(victim_channel).Classify.future(request([9.0, ms(slow_model, 600)]), timeout=30)
        wait_until(slow, lambda s: total(s, "bitmoji_queue_depth") == 1)  # the victim's item is queued first
        others = [stub.Classify.future(request([0.1 * (i + 1), ms(slow_model, 600)]), timeout=30) for i in range(3)]
        wait_until(slow, lambda s: total(s, "bitmoji_queue_depth") == 4)
        if phase == "in the forward pass":  # the blocker ends; the four queued items run as one batch
            assert blocker.result().predictions[0].logit == 1.0
            wait_until(
                slow, lambda s: total(s, "bitmoji_queue_depth") == 0 and sample(s, "bitmoji_inflight_requests") == 4
            )
        victim_channel.close()  # the client goes away: its call is cancelled under the server
        assert victim.exception(timeout=30).code() == grpc.StatusCode.CANCELLED  # "Channel closed!"
        assert [f.result().predictions[0].logit for f in others] == pytest.approx([0.1, 0.2, 0.3]), phase
        assert blocker.result().predictions[0].logit == 1.0
    after = wait_until(slow, lambda s: sample(s, "bitmoji_inflight_requests") == 0)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("bitmoji_requests_total", method="Classify", code="OK") == 8
    assert delta("bitmoji_requests_total", method="Classify", code="CANCELLED") == 2
    assert delta("bitmoji_items_dropped_total", reason="cancelled") == 1  # the queued victim never reached the model
    # batches: two blockers alone, the four together, then the three left when the victim was dropped
    assert delta("bitmoji_batch_size_count") == 4 and delta("bitmoji_batch_size_sum") == 1 + 4 + 1 + 3
    assert "error" not in slow.output().lower(), slow.output()


# -- SIGTERM under load --------------------------------------------------------------------


def test_sigterm_under_load_answers_every_accepted_call_refuses_new_ones_and_exits_0(slow_model, server_factory):
    path, _ = slow_model
    server = server_factory(
        path,
        "--max-batch-size",
        "4",
        "--max-queue",
        "64",
        "--max-items-per-call",
        "1",
        "--max-batch-delay-ms",
        "0",
        "--torch-threads",
        "1",
        "--decode-workers",
        "1",
        "--grace-period-s",
        "20",
        "--disable-gradient-probe",
    )
    row = [0.5, ms(slow_model, 25)]  # 25 ms per batch of 4, 64 callers: the queue holds every caller's item
    health: list[int] = []
    signalled = threading.Event()
    signal_time: list[float] = []

    def watch():
        with grpc.insecure_channel(server.target) as channel:
            try:
                for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                    health.append(response.status)
            except grpc.RpcError:
                pass  # the server closes the stream when it stops

    async def load() -> list[tuple[float, float, str, str]]:
        calls: list[tuple[float, float, str, str]] = []
        channel = grpc.aio.insecure_channel(server.target)
        stub = pb_grpc.ClassifierStub(channel)

        async def caller():
            for _ in range(1000):
                started = time.monotonic()
                try:
                    await stub.Classify(request(row), timeout=30)
                    calls.append((started, time.monotonic(), "OK", ""))
                except grpc.aio.AioRpcError as error:
                    calls.append((started, time.monotonic(), error.code().name, error.details() or ""))
                    if signalled.is_set():
                        return  # refused after the signal: this caller is done
                if signalled.is_set() and time.monotonic() - signal_time[0] > 5:
                    return

        async def stopper():
            await asyncio.sleep(1.5)
            signal_time.append(time.monotonic())
            server.proc.send_signal(signal.SIGTERM)
            signalled.set()

        await asyncio.wait_for(asyncio.gather(stopper(), *(caller() for _ in range(64))), 60)
        await channel.close()
        return calls

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_until(server, lambda s: True)
    calls = asyncio.run(load())
    assert server.proc.wait(30) == 0, server.output()
    watcher.join(10)
    t = signal_time[0]
    codes = Counter(code for _, _, code, _ in calls)
    in_flight = [c for c in calls if c[0] < t < c[1]]
    print(f"\nSIGTERM under load: {dict(codes)}; {len(in_flight)} calls in flight at the signal")
    # The drain refuses new calls with UNAVAILABLE (retryable) and answers every call it accepted: no call is
    # CANCELLED under a caller who did not cancel it, so a retrying client loses nothing.
    assert set(codes) <= {"OK", "UNAVAILABLE"}, [c for c in calls if c[2] not in ("OK", "UNAVAILABLE")][:5]
    assert not [c for c in calls if "before this call ran" in c[3]], "an accepted call was dropped"
    assert codes["UNAVAILABLE"] >= 1, "nothing was refused after the signal"
    # The server says how many calls it had accepted when it began refusing; every one of them was answered.
    line = next(line for line in server.output().splitlines() if "draining" in line)
    accepted = int(line.split("draining ")[1].split()[0])
    answered_after = sum(1 for started, ended, code, _ in calls if code == "OK" and ended > t)
    assert accepted >= 8 and answered_after >= accepted, (accepted, answered_after, line)
    assert (
        health
        and health[0] == health_pb2.HealthCheckResponse.SERVING
        and health[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    )
    assert "stopped" in server.output() and "cancelled" not in server.output()


# -- hot reload -----------------------------------------------------------------------------


def _nan_model_like(source, path) -> None:
    """A model with the source's metadata (so it passes the compatibility checks) whose outputs are NaN."""

    class NanNet(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).sum(1, keepdim=True) * float("nan")

    modelfile._atomic_save(
        modelfile.script(NanNet()), path, dict(modelfile.load_model(source).metadata, model_version="nan-1")
    )


def _replace(path, source) -> None:
    """Atomically, as an operator should: write beside it, then rename."""
    tmp = path.with_name(path.name + ".new")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def test_hot_reload_swaps_models_under_traffic_without_a_failed_call_and_refuses_bad_files(
    tmp_path, mlp_model_file, toy_model_file, server_factory
):
    served = tmp_path / "model.pt"
    shutil.copyfile(mlp_model_file, served)
    new_model = export_test_model("mlp", tmp_path / "new.pt", seed=1)
    old_version, new_version = modelfile.load_model(served).version, modelfile.load_model(new_model).version
    assert old_version != new_version
    server = server_factory(served, "--reload-poll-s", "0.2", "--max-batch-size", "4", "--max-batch-delay-ms", "1")
    image = small_image(128)
    stop = threading.Event()
    errors: list[str] = []
    versions: list[list[str]] = [[] for _ in range(3)]

    def traffic(i: int):
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            while not stop.is_set():
                try:
                    versions[i].append(
                        stub.Classify(pb.ClassifyRequest(inputs=[image_input(image)]), timeout=30).model_build
                    )
                except grpc.RpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")
                time.sleep(0.005)

    threads = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()

    def reloads(result):
        # the first load (at start) counts too
        return sample(scrape(server), "bitmoji_model_loads_total", model="bitmoji", result=result) - (result == "ok")

    def model_info_version():
        info = [
            dict(labels)
            for (name, labels), value in scrape(server).items()
            if name == "bitmoji_model_info" and value == 1
        ]
        return info[0]["build"]

    try:
        wait_until(server, lambda s: all(versions))
        assert model_info_version() == old_version
        _replace(served, new_model)  # the poller notices the new file
        deadline = time.monotonic() + 60
        while not all(v and v[-1] == new_version for v in versions):
            assert time.monotonic() < deadline, "the new model never served"
            time.sleep(0.05)
        assert reloads("ok") == 1 and model_info_version() == new_version
        assert (
            pb_grpc.ClassifierStub(grpc.insecure_channel(server.target))
            .GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            .model_build
            == new_version
        )

        # refused: a corrupt file (SIGHUP), an incompatible one (another input shape), one with NaN outputs
        (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a model")
        _nan_model_like(new_model, tmp_path / "nan.pt")
        for failed, bad in enumerate((tmp_path / "corrupt.pt", toy_model_file, tmp_path / "nan.pt"), start=1):
            _replace(served, bad)
            server.proc.send_signal(signal.SIGHUP)
            wait_until(
                server,
                lambda s, failed=failed: (
                    sample(s, "bitmoji_model_loads_total", model="bitmoji", result="failed") >= failed
                ),
                timeout=60,
            )
        time.sleep(0.5)  # traffic keeps flowing on the old model
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    output = server.output()
    assert not errors, errors[:5]
    assert reloads("ok") == 1 and reloads("failed") == 3, output
    assert model_info_version() == new_version
    for seen in versions:  # each caller saw the old model, then the new one, never back
        assert seen[0] == old_version and seen[-1] == new_version
        assert seen == sorted(seen, key=lambda v: v == new_version)
    assert "not a loadable TorchScript file" in output and "input shape" in output and "non-finite" in output
    assert output.count("refused") == 3 and f"still serving {new_version}" in output
    # SIGHUP on an unchanged file changes nothing
    _replace(served, new_model)
    server.proc.send_signal(signal.SIGHUP)
    wait_until(server, lambda s: "unchanged" in server.output())
    assert reloads("ok") == 1 and reloads("failed") == 3
    assert server.stop() == 0, server.output()


# -- the grace period (last: it stops the module's server) ---------------------------------


def test_calls_past_the_grace_period_are_cut_and_the_server_still_exits_0(slow, slow_model):
    """Runs last in this module: it stops the `slow` server (--grace-period-s 0.5)."""
    stub = pb_grpc.ClassifierStub(grpc.insecure_channel(slow.target))
    long_call = stub.Classify.future(request([1.0, ms(slow_model, 4000)]), timeout=30)
    wait_until(slow, running_alone)
    signalled = time.monotonic()
    slow.proc.send_signal(signal.SIGTERM)
    assert slow.proc.wait(30) == 0, slow.output()
    assert time.monotonic() - signalled < 3.5, "waited for the call instead of the grace period"
    assert long_call.exception() is not None and long_call.exception().code() != OK
    assert "grace period were cancelled" in slow.output()
