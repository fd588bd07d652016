"""Cold start: from process start to SERVING on the gRPC health service, and where that time goes.

Starts `python -m bitmoji.server` on a fixed free loopback port, polls `grpc.health.v1`
Check (from this process) until SERVING, and takes the median of several runs.
Issue 4's target for the MLP: at most 5 s.

The breakdown: interpreter start (`python -c pass`), then ONE fresh interpreter
doing the server's start-up steps in turn, each timed: `import torch`; `import grpc`
+ health + reflection; the rest of `import bitmoji.server.server`; loading the
model (`bitmoji.core.modelfile.load_model`); the warm-up (`ServedModel.warmup`). The rest
= SERVING (median) - all of those: config, gRPC start, ports, event loop, and noise
(on a busy machine one import of torch varies by seconds: the parts are medians of --runs).
Plus the slowest modules of `python -X importtime -c "import bitmoji.server.server"` (self time).
torchvision (1.7-2 s: it pulls in torchvision.models, torchvision.ops and
torch._dynamo) is off this path: the server imports it on its first JPEG, WebP or GIF.

    python -m bench.coldstart --model mlp --runs 3
    python -m bench.coldstart --model mlp --runs 3 --no-breakdown --server-arg=--workers=2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, export_model, free_port, loadavg, machine, progress, write_json


def time_to_serving(model: str, timeout: float = 120.0, server_cwd=None, server_args=()) -> dict:
    """One cold start: Popen -> health SERVING (and -> the first health answer).

    With `--workers N` in server_args this is when the first worker answers SERVING: what a load
    balancer's health check sees."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "bitmoji.server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *server_args,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=server_cwd or ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answered = serving = None
    try:
        # reconnect fast: by default a refused connection backs off for 1 s, 1.6 s, 2.6 s... and would blur the figure
        options = [
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.min_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 50),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = start + timeout
            while time.perf_counter() < deadline and proc.poll() is None:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.25).status
                except grpc.RpcError:
                    time.sleep(0.01)
                    continue
                now = time.perf_counter()
                answered = answered or now
                if status == health_pb2.HealthCheckResponse.SERVING:
                    serving = now
                    break
                time.sleep(0.005)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if serving is None:
        raise RuntimeError(f"the server did not reach SERVING within {timeout} s ({' '.join(cmd)})")
    return {"serving_s": serving - start, "health_answers_s": answered - start}


def _python_seconds(code: str, cwd=None) -> float:
    """Wall time of a fresh interpreter running `code` (start-up included)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], cwd=cwd or ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start


_STAGED = """
import sys, time
t = [time.perf_counter()]
import torch; t.append(time.perf_counter())
import grpc, grpc_health.v1.health, grpc_reflection.v1alpha.reflection; t.append(time.perf_counter())
import bitmoji.server.server; t.append(time.perf_counter())
from bitmoji.server.model import ServedModel
from bitmoji.core.modelfile import load_model
torch.set_num_threads(bitmoji.server.server.default_torch_threads(torch.device('cpu')))
loaded = load_model(sys.argv[1], 'cpu'); t.append(time.perf_counter())
ServedModel.create(loaded, max_pixels=1 << 24).warmup(32); t.append(time.perf_counter())
print(*(b - a for a, b in zip(t, t[1:])))
"""


def breakdown(model: str, server_cwd=None, runs: int = 1) -> dict:
    """A fresh interpreter doing the server's start-up steps in turn, timed (so the parts add up);
    per-part medians of `runs`.
    """
    cwd = server_cwd or ROOT
    out = {"interpreter_s": statistics.median(_python_seconds("pass", cwd) for _ in range(runs))}
    # torchvision is not on the path: the server imports it on its first JPEG/WebP/GIF (bitmoji.core.preprocess)
    names = ["import_torch_s", "import_grpc_s", "import_server_rest_s", "load_model_s", "warmup_s"]
    samples = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-c", _STAGED, model], cwd=cwd, check=True, capture_output=True, text=True)
        samples.append([float(x) for x in r.stdout.split()])
    out.update(
        (name, statistics.median(column)) for name, column in zip(names, zip(*samples, strict=True), strict=True)
    )
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import bitmoji.server.server"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = line[len("import time:") :].split("|")
            try:
                rows.append((int(parts[0]), int(parts[1]), parts[2].rstrip()))
            except ValueError:
                continue
    # "import time: self | cumulative | <2 spaces per nesting level>name": keep the first two levels
    top_level = {name.strip(): cum for _, cum, name in rows if len(name) - len(name.lstrip()) <= 3}
    out["importtime_cumulative_ms"] = {k: v / 1000 for k, v in sorted(top_level.items(), key=lambda kv: -kv[1])[:12]}
    out["importtime_self_top_ms"] = {
        name.strip(): self_us / 1000 for self_us, _, name in sorted(rows, reverse=True)[:12]
    }
    return out


def run(model: str = "mlp", runs: int = 3, server_cwd=None, with_breakdown: bool = True, server_args=()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(export_model(model, tmp)) if model in ("mlp", "cnn") else model
        times = []
        for i in range(runs):
            progress(f"coldstart: run {i + 1}/{runs}...")
            times.append(time_to_serving(path, server_cwd=server_cwd, server_args=server_args))
            progress(
                f"  SERVING after {times[-1]['serving_s']:.2f} s "
                f"(health answered after {times[-1]['health_answers_s']:.2f} s)"
            )
        result = {
            "benchmark": "coldstart",
            "model": model,
            "server_args": list(server_args),
            "runs": times,
            "serving_s_median": statistics.median(t["serving_s"] for t in times),
            "target_s": 5.0,
            "loadavg": loadavg(),
        }
        if with_breakdown:
            progress("coldstart: breakdown (fresh interpreters)...")
            b = result["breakdown"] = breakdown(path, server_cwd, runs)
            b["rest_s"] = result["serving_s_median"] - sum(v for k, v in b.items() if k.endswith("_s"))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.coldstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="mlp", help="model file, or mlp/cnn to export an untrained one (default mlp)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--server-cwd", default=None)
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="a flag for the server (repeat), e.g. --server-arg=--workers=2",
    )
    p.add_argument("--quick", action="store_true", help="--runs 1 --no-breakdown")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.no_breakdown = 1, True
    result = run(args.model, args.runs, args.server_cwd, not args.no_breakdown, args.server_arg)
    result["machine"] = machine()
    print(
        f"cold start to SERVING: median {result['serving_s_median']:.2f} s over {args.runs} runs (target <= 5 s); "
        f"loadavg {loadavg()}"
    )
    for k, v in result.get("breakdown", {}).items():
        if isinstance(v, float):
            print(f"  {k:28} {v:6.2f} s")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
