"""What the tests share: small exported models, a real server subprocess, request builders, metrics scraping.

One module, imported by the tests as `helpers` (tests/ is on sys.path through
its conftest.py); the fixtures built on these are in conftest.py.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from bitmoji.core.modelfile import build_metadata, export_model, export_torchscript
from bitmoji.trainer.models import build_model
from bitmoji.v1 import classifier_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("BITMOJI_REAL_DATA", ROOT.parent / "shared" / "data" / "bitmoji"))
READY_LINE = re.compile(r"^bitmoji-serve: ready on (?P<host>[\d.:\[\]a-z]+):(?P<port>\d+)")
NUMPY_DTYPES = {
    pb.DATA_TYPE_FLOAT32: "<f4",
    pb.DATA_TYPE_FLOAT64: "<f8",
    pb.DATA_TYPE_FLOAT16: "<f2",
    pb.DATA_TYPE_UINT8: "u1",
}

# -- models -----------------------------------------------------------------------------


def export_test_model(arch: str, path: Path, seed: int = 0, class_names=("eva", "not_eva")) -> Path:
    """An untrained (but seeded, deterministic) classifier exported exactly as the trainer does."""
    torch.manual_seed(seed)
    model = build_model(arch)
    metadata = build_metadata(
        architecture=arch, class_names=list(class_names), positive_class=class_names[0], model=model
    )
    return export_model(model, path, metadata)


class FaultyNet(nn.Module):
    """Raw tensors [2] in: column 0 is the logit; column 1 > 0 spins the CPU that many rounds, < 0 raises."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("w", torch.full((64, 64), 1.0 / 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 1] < 0).any()):
            raise RuntimeError("injected fault")
        h = torch.ones(64, 64)
        for _ in range(int(x[:, 1].max())):
            h = torch.tanh(h @ self.w)
        return x[:, :1] * self.scale + 0.0 * h[0, 0]


def export_faulty_model(path: Path, build: str = "faulty-1") -> Path:
    return export_torchscript(
        FaultyNet(), path, {"model_version": build, "input": {"shape": [2]}}, torch.tensor([[0.5, 0.0]])
    )


# -- a real server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    model: Path | None, *args: str, env: dict | None = None, timeout: float = 60, metrics: bool = True
) -> ServerProcess:
    """Start `python -m bitmoji.server` on a free loopback port and wait for its ready line.

    `model` is a model file (`--model`), or None when `args` say what to serve (`--model-repository`).
    """
    metrics_port = free_port() if metrics else 0
    what = ["--model", str(model)] if model is not None else []
    cmd = [
        sys.executable,
        "-m",
        "bitmoji.server",
        *what,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        str(metrics_port),
        *args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    log: list[str] = []
    ready = threading.Event()
    found: dict = {}

    def pump():
        for line in proc.stdout:
            log.append(line)
            match = READY_LINE.search(line)
            if match and not ready.is_set():
                found.update(match.groupdict())
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"server did not become ready ({' '.join(cmd)}):\n" + "".join(log))
    return ServerProcess(proc, found["host"].strip("[]"), int(found["port"]), metrics_port or None, log)


# -- requests -------------------------------------------------------------------------------


def png(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(out, format=fmt)
    return out.getvalue()


def small_image(size: int = 128, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def synthetic_images(n: int, seed: int = 0) -> list[bytes]:
    """Distinct images in several formats, modes and sizes (so each caller's answer is its own)."""
    rng = np.random.default_rng(seed)
    kinds = [("PNG", None, (128, 128)), ("PNG", "RGBA", (150, 200)), ("JPEG", "L", (64, 64)), ("PNG", "P", (128, 129))]
    images = []
    for i in range(n):
        fmt, mode, (h, w) = kinds[i % len(kinds)]
        # smooth gradients + noise: different per image, and not all noise (so JPEG is realistic)
        base = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
        array = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        images.append(png(array, fmt, mode))
    return images


def image_input(data: bytes) -> pb.Input:
    return pb.Input(image=data)


def tensor_input(tensor: torch.Tensor, dtype: int = pb.DATA_TYPE_FLOAT32) -> pb.Input:
    array = tensor.detach().cpu().numpy().astype(NUMPY_DTYPES[dtype])
    return pb.Input(tensor=pb.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes()))


def rows_request(*rows) -> pb.ClassifyRequest:
    """Raw tensor rows (e.g. FaultyNet's [logit, work]) as one ClassifyRequest."""
    return pb.ClassifyRequest(inputs=[tensor_input(torch.tensor(row, dtype=torch.float32)) for row in rows])


def from_proto(tensor: pb.Tensor) -> torch.Tensor:
    assert tensor.dtype == pb.DATA_TYPE_FLOAT32
    return torch.from_numpy(np.frombuffer(tensor.data, dtype="<f4").copy()).reshape(list(tensor.shape))


def expected_logits(module, inputs: torch.Tensor) -> list[float]:
    with torch.inference_mode():
        return module(inputs).reshape(-1).tolist()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def health_status(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


# -- metrics --------------------------------------------------------------------------------


def scrape(server) -> dict:
    """All samples of the server's /metrics: {(name, sorted label items): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels) -> float:
    """One sample's value (0 when absent); labels must match exactly."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """The sum of the samples of `name` whose labels include `labels` (e.g. over every model version)."""
    return sum(
        value for (n, items), value in samples.items() if n == name and all((k, v) in items for k, v in labels.items())
    )


def wait_until(server, condition, timeout: float = 10) -> dict:
    """Scrape until `condition(samples)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
