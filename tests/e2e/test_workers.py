"""`bitmoji-serve --workers N`: several processes on one port, one metrics endpoint summing them,
a dead worker restarted, a worker that cannot start failing the whole server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
import pytest
import torch
from helpers import ROOT, classify_loop, image_input, sample, scrape, synthetic_images, total

from bitmoji.core.modelfile import load_model
from bitmoji.core.preprocess import load_image, to_model_input
from bitmoji.server.config import ServerConfig, parse_config
from bitmoji.server.server import default_torch_threads
from bitmoji.server.workers import Supervisor, worker_cores
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _classify_on_fresh_channels(target: str, request: pb.ClassifyRequest, calls: int) -> list[pb.ClassifyResponse]:
    """One channel (so one TCP connection) per call: the kernel spreads connections over the workers."""
    responses = []
    for _ in range(calls):
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            responses.append(pb_grpc.ClassifierStub(channel).Classify(request, timeout=30))
    return responses


def _worker_config(argv: list[str]) -> ServerConfig:
    """The configuration a worker parses from the command line its supervisor starts it with."""
    supervisor_config = parse_config(argv, environ={})
    command = Supervisor(supervisor_config, argv, port=1234).command()
    assert command[1:3] == ["-m", "bitmoji.server"]
    return parse_config(command[3:], environ={})


def test_each_worker_sizes_its_threads_to_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr("bitmoji.server.config.cpu_count", lambda: 16)
    assert worker_cores(ServerConfig(model="m", workers=4)) == 4
    assert worker_cores(ServerConfig(model="m", workers=32)) == 1
    assert worker_cores(ServerConfig(model="m", workers=2, cores=6)) == 3  # --cores: e.g. the container's CPU limit
    assert parse_config(["--model", "m"], environ={"BITMOJI_CORES": "3"}).resolved_decode_workers == 3
    with pytest.raises(ValueError, match="--cores must be at least 1"):
        ServerConfig(model="m", cores=0)

    worker = _worker_config(["--model", "m", "--workers", "4", "--port", "0"])
    assert (worker.workers, worker.port, worker.metrics_port, worker.cores) == (1, 1234, 0, 4)
    assert worker.resolved_decode_workers == 4
    assert default_torch_threads(torch.device("cpu"), cores=worker.resolved_cores) == 2
    assert default_torch_threads(torch.device("cuda"), cores=worker.resolved_cores) == 1
    # the user's thread flags apply to each worker as given
    worker = _worker_config(["--model", "m", "--workers", "4", "--torch-threads", "3", "--decode-workers", "5"])
    assert (worker.torch_threads, worker.resolved_decode_workers, worker.cores) == (3, 5, 4)


def test_the_supervisor_never_imports_torch():
    # It starts its workers at once, instead of after its own ~2 s torch import, and stays ~22 MB instead of ~520.
    code = (
        "import sys, bitmoji.server.cli, bitmoji.server.workers; print("
        "sorted(m for m in ('torch', 'numpy', 'PIL', 'grpc') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_two_workers_serve_one_port_with_summed_metrics_and_restart_a_dead_worker(server_factory, mlp_model_file):
    server = server_factory(mlp_model_file, "--workers", "2", timeout=120)
    output = server.output()
    assert output.count(": ready on ") == 3 and "worker 1: ready on" in output and "worker 2: ready on" in output
    workers = _children(server.proc.pid)
    assert len(workers) == 2

    images = synthetic_images(3)
    request = pb.ClassifyRequest(inputs=[image_input(data) for data in images])
    module = load_model(mlp_model_file).module
    with torch.inference_mode():
        expected = module(to_model_input(torch.stack([load_image(data) for data in images]))).reshape(-1).tolist()
    calls = 12
    for response in _classify_on_fresh_channels(server.target, request, calls):
        assert [p.logit for p in response.predictions] == pytest.approx(expected, abs=1e-5)

    samples = scrape(server)  # the supervisor's endpoint: both workers' files, summed
    assert total(samples, "bitmoji_requests_total", method="Classify", code="OK") == calls
    assert total(samples, "bitmoji_items_total") == 3 * calls
    assert total(samples, "bitmoji_request_duration_seconds_count", method="Classify") == calls
    threads_each = default_torch_threads(torch.device("cpu"), cores=worker_cores(ServerConfig(model="m", workers=2)))
    assert sample(samples, "bitmoji_torch_threads") == 2 * threads_each  # a live gauge: summed over the two workers
    assert [labels for (name, labels), value in samples.items() if name == "bitmoji_model_info" and value == 1]

    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.output().count(": ready on ") < 4:
        time.sleep(0.1)
    assert "exited with -9: restarting it" in server.output(), server.output()
    assert server.output().count(": ready on ") == 4, server.output()
    restarted = _children(server.proc.pid)
    assert len(restarted) == 2 and workers[0] not in restarted
    assert len(_classify_on_fresh_channels(server.target, request, 4)) == 4
    samples = scrape(server)
    assert sample(samples, "bitmoji_torch_threads") == 2 * threads_each  # the dead worker's live gauge is gone
    assert total(samples, "bitmoji_requests_total", method="Classify", code="OK") == calls + 4  # its counts stay

    assert server.stop() == 0, server.output()
    assert "bitmoji-serve: stopped (2 workers, 1 restarted)" in server.output()
    for pid in restarted:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_a_worker_that_cannot_start_stops_the_server_with_its_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a model")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bitmoji.server",
            "--model",
            str(bad),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--workers",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "worker 1: error:" in result.stderr or "worker 2: error:" in result.stderr
    assert "before the server was ready: stopping all workers" in result.stderr
    assert "ready on" not in result.stderr


def test_a_crashed_worker_fails_no_call_and_sigterm_during_its_restart_exits_0(server_factory, mlp_model_file):
    server = server_factory(mlp_model_file, "--workers", "2", timeout=120)
    image = synthetic_images(1)[0]
    stop, outcomes, failures = threading.Event(), Counter(), []
    callers = [
        threading.Thread(target=classify_loop, args=(server.target, image, stop, outcomes, failures), daemon=True)
        for _ in range(4)
    ]
    for caller in callers:
        caller.start()
    try:
        deadline = time.monotonic() + 30
        while outcomes["OK"] < 50:
            assert time.monotonic() < deadline and not failures, (outcomes, failures)
            time.sleep(0.05)
        victim = _children(server.proc.pid)[0]
        before_kill = outcomes["OK"]
        os.kill(victim, signal.SIGKILL)  # under load: its callers' calls in flight die with it
        while "restarting it in" not in server.output():
            assert time.monotonic() < deadline + 30, server.output()
            time.sleep(0.02)
        while outcomes["OK"] < before_kill + 100:  # the other worker carries the load meanwhile
            assert time.monotonic() < deadline + 60, (outcomes, failures)
            time.sleep(0.05)
    finally:
        stop.set()
        for caller in callers:
            caller.join(30)
    assert not failures and set(outcomes) == {"OK"}, (outcomes, failures[:5])
    # SIGTERM while the dead worker is being restarted (it waits 1 s, then starts): a clean stop, exit 0
    restarts = server.output().count("restarting it in")
    os.kill(_children(server.proc.pid)[0], signal.SIGKILL)
    while server.output().count("restarting it in") == restarts:
        time.sleep(0.02)
    assert server.stop() == 0, server.output()
    assert "while stopping" not in server.output()


def test_a_worker_that_keeps_dying_makes_the_supervisor_give_up(server_factory, mlp_model_file, tmp_path):
    model = tmp_path / "model.pt"
    shutil.copyfile(mlp_model_file, model)
    server = server_factory(
        model, "--workers", "2", "--worker-restart-limit", "2", "--worker-restart-window-s", "120", timeout=120
    )
    model.write_bytes(b"no longer a model")  # every restart now fails at start
    os.kill(_children(server.proc.pid)[0], signal.SIGKILL)
    assert server.proc.wait(120) == 1, server.output()
    output = server.output()
    assert output.count("restarting it in 1 s") == 1 and "restarting it in 2 s" in output  # backing off
    assert "died 3 times in 120 s (--worker-restart-limit 2): giving up" in output
    assert "worker 2: stopped" in output or "worker 1: stopped" in output  # the healthy worker drained
