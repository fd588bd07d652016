"""Helpers shared by the benchmark scripts: real images, exported models, a server subprocess, machine facts.

Nothing here writes into the repository: models go to a temporary directory,
the real images are read in place (never copied).
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bitmoji.server.config import cpu_count  # torch-free: the load generator's processes import this module

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = Path(os.environ.get("BITMOJI_REAL_DATA", ROOT.parent / "shared" / "data" / "bitmoji"))
READY_LINE = re.compile(r"^bitmoji-serve: ready on (?P<host>[\d.:\[\]a-z]+):(?P<port>\d+)")
CLASSIFY = "/bitmoji.v1.Classifier/Classify"
PROBE = "/bitmoji.v1.Classifier/GradientProbe"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on (versions imported lazily: torch costs a second)."""
    import grpc
    import torch

    return {
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "loadavg": loadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def real_images(
    data: str | os.PathLike | None = None, n: int = 16, size: tuple[int, int] | None = (128, 128)
) -> list[bytes]:
    """`n` PNGs of the real bitmoji set (both classes, sorted, so every run sends the same bytes).

    With `size`, only images of that size (the common 128x128). Falls back to
    the project's synthetic generator when the real set is not there (so the
    smoke tests run anywhere); `source` tells which in the results.
    """
    root = Path(data) if data else DEFAULT_DATA
    files = sorted((root / "train").glob("*/*.png")) if (root / "train").is_dir() else []
    out: list[bytes] = []
    if files:
        from PIL import Image

        # alternate the classes: tom_0, not_tom_0, tom_1, ...
        by_class: dict[str, list[Path]] = {}
        for f in files:
            by_class.setdefault(f.parent.name, []).append(f)
        order = [f for group in zip(*by_class.values(), strict=False) for f in group]
        for f in order:
            if size is not None:
                with Image.open(f) as img:
                    if img.size != (size[1], size[0]):
                        continue
            out.append(f.read_bytes())
            if len(out) == n:
                break
    if not out:
        out = synthetic_images(n)
    return out


def images_source(data: str | os.PathLike | None = None) -> str:
    root = Path(data) if data else DEFAULT_DATA
    return str(root) if (root / "train").is_dir() else "synthetic (real set not found)"


def synthetic_images(n: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        array = np.clip(
            np.linspace(0, 255, 128)[None, :, None] * rng.random(3) + rng.normal(0, 30, (128, 128, 3)), 0, 255
        )
        buf = io.BytesIO()
        Image.fromarray(array.astype("uint8")).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def export_model(arch: str, directory: str | os.PathLike, seed: int = 0) -> Path:
    """An untrained, seeded model exported exactly as the trainer exports (weights do not change speed)."""
    import torch

    from bitmoji.core.modelfile import build_metadata
    from bitmoji.core.modelfile import export_model as _export
    from bitmoji.trainer.models import build_model

    path = Path(directory) / f"{arch}.pt"
    if path.exists():
        return path
    torch.manual_seed(seed)
    model = build_model(arch)
    metadata = build_metadata(architecture=arch, class_names=["not_tom", "tom"], positive_class="tom", model=model)
    return _export(model, path, metadata)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def classify_request(image: bytes) -> bytes:
    """One serialised ClassifyRequest with one image: built once, sent many times."""
    from bitmoji.v1 import classifier_pb2 as pb

    return pb.ClassifyRequest(inputs=[pb.Input(image=image)]).SerializeToString()


@dataclass
class Server:
    """A `python -m bitmoji.server` subprocess started by a benchmark."""

    proc: subprocess.Popen
    target: str
    metrics_port: int | None
    started: float
    ready_s: float
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics_text(self) -> str:
        import urllib.request

        if not self.metrics_port:
            return ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_server(
    model: str | os.PathLike,
    args: list[str] = (),
    *,
    cwd: str | os.PathLike | None = None,
    metrics: bool = True,
    timeout: float = 120,
    python: str = sys.executable,
    env: dict | None = None,
    repository: bool = False,
) -> Server:
    """Start `python -m bitmoji.server` on a free loopback port (from `cwd`: the repo, or a patched copy) and wait for
    ready. `model` is a model file, or a model repository folder with `repository=True`."""
    metrics_port = free_port() if metrics else 0
    cmd = [
        python,
        "-m",
        "bitmoji.server",
        "--model-repository" if repository else "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        str(metrics_port),
        *args,
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd or ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    log: list[str] = []
    ready = threading.Event()
    found: dict = {}

    def pump():
        for line in proc.stdout:
            log.append(line)
            m = READY_LINE.search(line)
            if m and not ready.is_set():
                found.update(m.groupdict(), at=time.perf_counter())
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(timeout) or not found:
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"server did not become ready ({' '.join(cmd)}):\n" + "".join(log))
    target = f"{found['host'].strip('[]')}:{found['port']}"
    return Server(proc, target, metrics_port or None, started, found["at"] - started, log)


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict:
    """Nearest-rank percentiles of `values` (ms in, ms out); empty -> None."""
    if not values:
        return {f"p{q}": None for q in qs}
    s = sorted(values)
    return {f"p{q}": s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))] for q in qs}


def median(values):
    return statistics.median(values) if values else None


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, its threads and its live child processes
    (`--workers`, TorchServe's workers; Linux /proc).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # any thread may have started a child (TorchServe's Java does)
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return (int(fields[11]) + int(fields[12])) / ticks + sum(proc_cpu_seconds(c) for c in children)


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2, default=str)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
