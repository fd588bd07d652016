"""What the tests share: small exported models, a real server subprocess, request builders, metrics scraping.

One module, imported by the tests as `helpers` (tests/ is on sys.path through
its conftest.py); the fixtures built on these are in conftest.py.
"""

from __future__ import annotations

import asyncio
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from bitmoji.core.modelfile import build_metadata, export_model, export_torchscript
from bitmoji.trainer.models import build_model
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc

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


def export_faulty_model(path: Path, build: str = "faulty-1", *, scale: float = 1.0, classes: bool = False) -> Path:
    """FaultyNet with its logit scaled by `scale` (-1: every label flips), optionally with class names."""
    net = FaultyNet()
    with torch.no_grad():
        net.scale.fill_(scale)
    metadata: dict = {"model_version": build, "input": {"shape": [2]}}
    if classes:
        metadata.update(class_names=["eva", "not_eva"], positive_class="eva")
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_torchscript(net, path, metadata, torch.tensor([[0.5, 0.0]]))


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


def classify_loop(target: str, image: bytes, stop: threading.Event, outcomes: Counter, failures: list, **client):
    """Steady load through the project's client (its retries, and round robin when asked), counting every
    outcome by code, until `stop` is set; a failure's code and details also go to `failures`."""
    from bitmoji.client import BitmojiClient, BitmojiError

    with BitmojiClient(target, timeout=20, **client) as bitmoji:
        while not stop.is_set():
            try:
                bitmoji.classify([image])
                outcomes["OK"] += 1
            except BitmojiError as error:
                outcomes[error.code.name] += 1
                failures.append(f"{error.code.name}: {error.details}")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# -- fakes of the other side, for the client's unit tests ---------------------------------------
# A grpc.aio server (as the real one is) on a loopback port, with a scripted Classifier and a small
# ModelRepository that speak the proto. They fake the server, not the client: the client under test talks
# real gRPC to them. The fake follows the proto's contract: empty names mean the default model and version,
# every response names the model, version and build that answered, and the server sends the call's
# x-request-id back in its trailing metadata (generating one when the call had none).

READY, FAILED, UNAVAILABLE = pb.MODEL_STATE_READY, pb.MODEL_STATE_FAILED, pb.MODEL_STATE_UNAVAILABLE


class AioServer:
    """A grpc.aio server run by an event loop in its own thread; `add(server)` callables register servicers."""

    def __init__(self, *adders: Callable[[grpc.aio.Server], None], port: int = 0):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.run(self._start(adders, port))

    async def _start(self, adders, port: int):
        server = grpc.aio.server()
        for add in adders:
            add(server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server, bound

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """None: cancel the calls in flight (they end CANCELLED); a grace: GOAWAY, answer them, then stop."""
        if self.loop.is_running():
            self.run(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def version(number: str, state: int = READY, reason: str = "", build: str = "") -> pb.ModelVersionStatus:
    return pb.ModelVersionStatus(
        version=number,
        state=state,
        reason=reason,
        build=build or (f"b{number}" if state == READY else ""),
        architecture="cnn" if state == READY else "",
        memory_bytes=50 * 2**20 if state == READY else 0,
    )


class FakeRepository(classifier_pb2_grpc.ModelRepositoryServicer):
    """Two models: cnn (versions 1, 2 READY, 3 in the repository only) and mlp (1 READY); cnn is the default.
    A version named "bad" fails to load. With `token`, every call needs `authorization: Bearer <token>`."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.metadata: list[dict[str, str]] = []
        self.models: dict[str, pb.ModelStatus] = {
            "cnn": pb.ModelStatus(
                name="cnn", versions=[version("1"), version("2"), version("3", UNAVAILABLE, "not loaded")]
            ),
            "mlp": pb.ModelStatus(name="mlp", versions=[version("1")]),
        }
        self.default_model = "cnn"
        for model in self.models.values():
            self._refresh(model)

    @staticmethod
    def _refresh(model: pb.ModelStatus) -> None:
        ready = [v.version for v in model.versions if v.state == READY]
        if not model.default_pinned or model.default_version not in ready:
            model.default_version = max(ready, key=int) if ready else ""

    async def _check(self, context) -> None:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        if self.token and metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the management token is needed")

    async def _model(self, name: str, context) -> pb.ModelStatus:
        if name not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {name!r}")
        return self.models[name]

    async def _ready(self, model: pb.ModelStatus, number: str, context) -> None:
        if not any(v.version == number and v.state == READY for v in model.versions):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{model.name} version {number} is not READY")

    async def ListModels(self, request, context):
        await self._check(context)
        models = [m for m in self.models.values() if not request.ready_only or m.default_version]
        return pb.ListModelsResponse(models=models, default_model=self.default_model)

    async def LoadModel(self, request, context):
        await self._check(context)
        model = await self._model(request.model_name, context)
        wanted = list(request.versions) or [v.version for v in model.versions]
        for number in wanted:
            existing = [v for v in model.versions if v.version == number]
            state = FAILED if number == "bad" else READY
            reason = "bad.pt: not a TorchScript file" if state == FAILED else ""
            if existing:
                existing[0].CopyFrom(version(number, state, reason))
            else:
                model.versions.append(version(number, state, reason))
        self._refresh(model)
        return pb.LoadModelResponse(model=model)

    async def UnloadModel(self, request, context):
        await self._check(context)
        model = await self._model(request.model_name, context)
        for v in model.versions:
            if not request.versions or v.version in request.versions:
                v.CopyFrom(version(v.version, UNAVAILABLE, "unloaded"))
        self._refresh(model)
        return pb.UnloadModelResponse(model=model)

    async def SetDefaultVersion(self, request, context):
        await self._check(context)
        model = await self._model(request.model_name, context)
        if request.version:
            await self._ready(model, request.version, context)
        model.previous_default_version = model.default_version
        model.default_pinned = bool(request.version)
        model.default_version = request.version
        if model.canary_version == request.version:
            model.canary_version, model.canary_weight = "", 0.0
        if model.shadow_version == request.version:
            model.shadow_version = ""
        self._refresh(model)
        return pb.SetDefaultVersionResponse(model=model)

    async def SetTraffic(self, request, context):
        await self._check(context)
        model = await self._model(request.model_name, context)
        for number in filter(None, (request.canary_version, request.shadow_version)):
            await self._ready(model, number, context)
        model.canary_version, model.canary_weight = request.canary_version, request.canary_weight
        model.shadow_version = request.shadow_version
        return pb.SetTrafficResponse(model=model)


class FakeClassifier(classifier_pb2_grpc.ClassifierServicer):
    """Answers as the repository's model and version the call names (or their defaults). Scripted faults:
    the first `failures` attempts of Classify, GradientProbe and StreamClassify end with `code` (after
    `headers_first`: sending response headers first; `stream_fail_after`: the stream's n-th answer),
    with `pushback` as grpc-retry-pushback-ms. Records every attempt's time, metadata and request."""

    def __init__(self, repository: FakeRepository | None = None):
        self.repository = repository or FakeRepository()
        self.attempts: list[float] = []
        self.metadata: list[dict[str, str]] = []
        self.requests: list[object] = []
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.pushback: str | None = None
        self.headers_first = False
        self.stream_fail_after = 0
        self.request_ids = 0

    def _answerer(self, request) -> tuple[str, str, str]:
        model = self.repository.models[request.model_name or self.repository.default_model]
        number = request.model_version or model.default_version
        build = next((v.build for v in model.versions if v.version == number), "")
        return model.name, number, build

    async def _attempt(self, request, context) -> bool:
        """Records the attempt and sends the request id back; True when this attempt is to fail."""
        self.attempts.append(time.monotonic())
        self.requests.append(request)
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        self.request_ids += 1
        trailing = [("x-request-id", metadata.get("x-request-id") or f"srv-{self.request_ids}")]
        if self.pushback is not None:
            trailing.append(("grpc-retry-pushback-ms", self.pushback))
        context.set_trailing_metadata(trailing)
        return len(self.attempts) <= self.failures

    async def Classify(self, request, context):
        if await self._attempt(request, context):
            if self.headers_first:
                await context.send_initial_metadata((("x-served-by", "fake"),))
            await context.abort(self.code, f"scripted failure {len(self.attempts)}")
        if any(i.image == b"bad" for i in request.inputs):
            index = next(i for i, item in enumerate(request.inputs) if item.image == b"bad")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{index}]: not an image Pillow can read")
        name, number, build = self._answerer(request)
        return pb.ClassifyResponse(
            predictions=[pb.Prediction(label="eva", probability=0.75, logit=1.0986) for _ in request.inputs],
            model_name=name,
            model_version=number,
            model_build=build,
        )

    async def StreamClassify(self, request_iterator, context):
        fail = None
        sent = 0
        async for request in request_iterator:
            if fail is None:
                fail = await self._attempt(request, context)
            if fail and sent == self.stream_fail_after:
                await context.abort(self.code, f"scripted stream failure after {sent} answers")
            name, number, build = self._answerer(request)
            sent += 1
            yield pb.ClassifyResponse(
                predictions=[pb.Prediction(label=str(len(request.inputs)), probability=0.5) for _ in request.inputs],
                model_name=name,
                model_version=number,
                model_build=build,
            )

    async def GradientProbe(self, request, context):
        if await self._attempt(request, context):
            await context.abort(self.code, f"scripted failure {len(self.attempts)}")
        name, number, build = self._answerer(request)
        count = len(request.inputs)
        return pb.GradientProbeResponse(
            loss=0.5,
            outputs=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[count, 1], data=b"\x00\x00\x80\x3f" * count),
            parameters=[
                pb.ParameterGradient(
                    name="w",
                    shape=[2, 2],
                    norm=1.0,
                    values=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\x00\x00\x00\x40" * 4),
                )
            ],
            input_gradients=[
                pb.InputGradient(gradient=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[3], data=b"\x01\x02\x03"))
            ]
            * count,
            model_name=name,
            model_version=number,
            model_build=build,
        )

    async def GetModelInfo(self, request, context):
        await self._attempt(request, context)
        name, number, build = self._answerer(request)
        return pb.GetModelInfoResponse(
            model_name=name,
            model_version=number,
            model_build=build,
            architecture="cnn",
            class_names=["eva", "not_eva"],
            positive_class="eva",
            input_shape=[3, 128, 128],
            metadata_json='{"metrics": {"accuracy": 0.9, "by_class": {"eva": 0.8}}, "input": {"shape": [3, 128, 128]}}',
            device="cpu",
            status=self.repository.models[name],
        )


def serve_fakes(
    classifier: FakeClassifier | None = None, repository: FakeRepository | None = None, port: int = 0
) -> tuple[AioServer, FakeClassifier]:
    """A server with the Classifier, the ModelRepository and health (SERVING)."""
    repository = repository or (classifier.repository if classifier else FakeRepository())
    classifier = classifier or FakeClassifier(repository)
    server = AioServer(
        lambda s: classifier_pb2_grpc.add_ClassifierServicer_to_server(classifier, s),
        lambda s: classifier_pb2_grpc.add_ModelRepositoryServicer_to_server(repository, s),
        lambda s: health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), s),
        port=port,
    )
    return server, classifier
