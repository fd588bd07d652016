"""Shared fixtures: small exported models, the real data, and real server subprocesses on free loopback ports.

Tests live in two places: tests/ holds in-process tests (core, trainer,
engine, batcher, codecs, client units, configuration), tests/e2e/ the
end-to-end tests that start real `bitmoji-serve` processes and talk gRPC to
them. Every e2e test is marked `e2e` and `slow` here; `scripts/test -m "not slow"`
is the fast subset.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REAL_DATA, ServerProcess, export_test_model, start_server

from bitmoji.core import modelfile
from bitmoji.trainer.models import ToyNetwork

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def mlp_model_file(tmp_path_factory) -> Path:
    return export_test_model("mlp", tmp_path_factory.mktemp("models") / "mlp.pt")


@pytest.fixture(scope="session")
def cnn_model_file(tmp_path_factory) -> Path:
    return export_test_model("cnn", tmp_path_factory.mktemp("models") / "cnn.pt")


@pytest.fixture(scope="session")
def toy_model_file(tmp_path_factory) -> Path:
    """The lecture's 1-2-1 network with its worked-example weights, and no metadata."""
    path = tmp_path_factory.mktemp("models") / "toy.pt"
    return modelfile.export_torchscript(ToyNetwork.lecture(), path, {}, torch.tensor([[1.0], [0.5]]))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "train").is_dir():
        pytest.skip(f"real bitmoji data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture
def server_factory():
    """Start servers with `server_factory(model_path, *flags)`; all are stopped at teardown."""
    started: list[ServerProcess] = []

    def factory(model: Path | None, *args: str, **kwargs) -> ServerProcess:
        server = start_server(model, *args, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
