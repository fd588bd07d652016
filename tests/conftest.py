"""Shared fixtures: small exported models and a real server subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from bench.common import free_port  # noqa: F401 (re-exported: tests import it from here)
from bench.common import start_server as launch_server
from bitmoji.core.modelfile import build_metadata, export_model
from bitmoji.trainer.models import ToyNetwork, build_model

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("BITMOJI_REAL_DATA", ROOT.parent / "shared" / "data" / "bitmoji"))


def export_test_model(arch: str, path: Path, seed: int = 0, class_names=("eva", "not_eva")) -> Path:
    """An untrained (but seeded, deterministic) classifier exported exactly as the trainer does."""
    torch.manual_seed(seed)
    model = build_model(arch)
    metadata = build_metadata(
        architecture=arch, class_names=list(class_names), positive_class=class_names[0], model=model
    )
    return export_model(model, path, metadata)


@pytest.fixture(scope="session")
def mlp_model_file(tmp_path_factory) -> Path:
    return export_test_model("mlp", tmp_path_factory.mktemp("models") / "mlp.pt")


@pytest.fixture(scope="session")
def cnn_model_file(tmp_path_factory) -> Path:
    return export_test_model("cnn", tmp_path_factory.mktemp("models") / "cnn.pt")


@pytest.fixture(scope="session")
def toy_model_file(tmp_path_factory) -> Path:
    """The lecture's 1-2-1 network with its worked-example weights, and no metadata."""
    from bitmoji.core import modelfile

    path = tmp_path_factory.mktemp("models") / "toy.pt"
    return modelfile.export_torchscript(ToyNetwork.lecture(), path, {}, torch.tensor([[1.0], [0.5]]))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "train").is_dir():
        pytest.skip(f"real bitmoji data not found at {REAL_DATA}")
    return REAL_DATA


@dataclass
class ServerProcess:
    """A `bitmoji-serve` subprocess; `target` is host:port for a gRPC channel."""

    proc: subprocess.Popen
    host: str
    port: int
    metrics_port: int | None
    log: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def output(self) -> str:
        return "".join(self.log)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(
    model: Path, *args: str, env: dict | None = None, timeout: float = 60, metrics: bool = True
) -> ServerProcess:
    """Start `python -m bitmoji.server` on a free loopback port and wait for its ready line (the benchmarks' own launcher)."""
    server = launch_server(model, list(args), metrics=metrics, timeout=timeout, env=env)
    host, _, port = server.target.rpartition(":")
    return ServerProcess(server.proc, host, int(port), server.metrics_port, server.log)


@pytest.fixture
def server_factory():
    """Start servers with `server_factory(model_path, *flags)`; all are stopped at teardown."""
    started: list[ServerProcess] = []

    def factory(model: Path, *args: str, **kwargs) -> ServerProcess:
        server = start_server(model, *args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
