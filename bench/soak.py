"""Soak test: steady concurrency against one server for minutes; errors and server memory over time.

Not part of CI (a 2-second smoke run is: tests/test_hardening_soak.py). It
starts a server on 127.0.0.1 (or uses --target), runs `--concurrency` callers
that each send one image per Classify call back to back for `--duration`
seconds, and every `--interval` seconds prints calls, throughput, errors by
status, latency p50/p99 and the server's resident memory (VmRSS from
/proc/PID/status). At the end: totals, and RSS growth from the end of the
warm-up to the end, also as a least-squares slope in MiB per minute (a leak
shows as a steady slope; allocator noise does not).

    python -m bench.soak --duration 600 --concurrency 32                 # an untrained MLP, synthetic images
    python -m bench.soak --model runs/cnn/model.pt --images ../shared/data/bitmoji/valid --duration 1800
    python -m bench.soak --target 127.0.0.1:50051 --pid 4242 --duration 300

Exit status 0 when no call failed, the server (if started here) stopped with
0, and RSS grew less than --max-rss-growth-mib (when given); 1 otherwise.
Every call has a deadline; the run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_LINE = re.compile(r"ready on (?P<host>[\d.:\[\]a-z]+):(?P<port>\d+)")
MIB = 1024 * 1024


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60 * sum((t - mean_t) * (r - mean_r) for t, r in samples) / var if var else 0.0


def synthetic_images(n: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(out, format="PNG")
        images.append(out.getvalue())
    return images


def folder_images(folder: Path, n: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
    if not files:
        raise SystemExit(f"soak: no images under {folder}")
    return [p.read_bytes() for p in files]


def export_default_model(directory: Path) -> Path:
    """An untrained (seeded) MLP, exported as the trainer does: the served model needs no training here."""
    import torch

    from bitmoji.core.modelfile import build_metadata, export_model
    from bitmoji.trainer.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp")
    metadata = build_metadata(architecture="mlp", class_names=["eva", "not_eva"], positive_class="eva", model=model)
    return export_model(model, directory / "mlp.pt", metadata)


class Server:
    """`python -m bitmoji.server` on a free loopback port; its log is kept, and lines with errors counted."""

    def __init__(self, model: Path, extra: list[str]):
        cmd = [
            sys.executable,
            "-m",
            "bitmoji.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            *extra,
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self._ready = threading.Event()
        self.target = ""
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(120) or not self.target:
            self.proc.kill()
            raise SystemExit("soak: the server did not start:\n" + "".join(self.log[-20:]))

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            match = READY_LINE.search(line)
            if match and not self.target:
                self.target = f"{match['host'].strip('[]')}:{match['port']}"
                self._ready.set()
        self._ready.set()

    def error_lines(self) -> list[str]:
        return [line for line in self.log if "error" in line.lower() or "Traceback" in line]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


async def soak(args, target: str, pid: int | None, images: list[bytes]) -> dict:
    import grpc

    from bitmoji.v1 import classifier_pb2 as pb

    requests = [pb.ClassifyRequest(inputs=[pb.Input(image=image)]).SerializeToString() for image in images]
    channels = [grpc.aio.insecure_channel(target) for _ in range(min(4, args.concurrency))]
    calls = [
        c.unary_unary(
            "/bitmoji.v1.Classifier/Classify",
            request_serializer=None,
            response_deserializer=pb.ClassifyResponse.FromString,
        )
        for c in channels
    ]
    errors: Counter = Counter()
    latencies: list[float] = []
    done = 0
    started = time.monotonic()
    end = started + args.duration

    async def caller(i: int) -> None:
        nonlocal done
        call = calls[i % len(calls)]
        k = i
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                response = await call(requests[k % len(requests)], timeout=args.timeout)
                if len(response.predictions) != 1:
                    errors["WRONG_ANSWER"] += 1
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
            latencies.append(time.perf_counter() - t0)
            done += 1
            k += 1

    rss_samples: list[tuple[float, float]] = []
    report: list[dict] = []

    async def reporter() -> None:
        last_done, last_t = 0, started
        while True:
            await asyncio.sleep(min(args.interval, max(0.0, end - time.monotonic())))
            now = time.monotonic()
            rss = rss_mib(pid) if pid else None
            elapsed = now - started
            if rss is not None and elapsed >= args.warmup:
                rss_samples.append((elapsed, rss))
            window = latencies[:]
            latencies.clear()
            row = {
                "t_s": round(elapsed, 1),
                "calls": done,
                "rate_per_s": round((done - last_done) / max(now - last_t, 1e-9), 1),
                "errors": dict(errors),
                "p50_ms": round(percentile(window, 0.5) * 1e3, 2),
                "p99_ms": round(percentile(window, 0.99) * 1e3, 2),
                "rss_mib": None if rss is None else round(rss, 1),
            }
            report.append(row)
            base = rss_samples[0][1] if rss_samples else None
            rss_text = (
                "n/a"
                if rss is None
                else f"{rss:.1f} MiB" + (f" ({rss - base:+.1f} since warm-up)" if base is not None else " (warm-up)")
            )
            print(
                f"[{elapsed:6.1f}s] calls {done} ({row['rate_per_s']:.0f}/s)  errors {sum(errors.values())}"
                f"  p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms  server RSS {rss_text}",
                flush=True,
            )
            last_done, last_t = done, now
            if now >= end:
                return

    try:
        await asyncio.wait_for(
            asyncio.gather(reporter(), *(caller(i) for i in range(args.concurrency))), args.duration + args.timeout + 30
        )
    finally:
        for channel in channels:
            await channel.close()
    growth = rss_samples[-1][1] - rss_samples[0][1] if len(rss_samples) > 1 else None
    return {
        "target": target,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "calls": done,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "rss_start_mib": rss_samples[0][1] if rss_samples else None,
        "rss_end_mib": rss_samples[-1][1] if rss_samples else None,
        "rss_growth_mib": growth,
        "rss_slope_mib_per_min": round(slope_per_minute(rss_samples), 3) if rss_samples else None,
        "intervals": report,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model file for the server started here (default: an untrained MLP)")
    p.add_argument("--target", help="host:port of a running server instead of starting one")
    p.add_argument("--pid", type=int, help="with --target: the server's process id, to report its RSS")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent callers (default %(default)s)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between progress lines (default %(default)s)")
    p.add_argument(
        "--warmup", type=float, default=5.0, help="seconds before RSS growth is measured (default %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="deadline of each call in seconds (default %(default)s)")
    p.add_argument(
        "--images", type=Path, help="a folder of PNG/JPEG images to send (default: 16 synthetic 128x128 PNGs)"
    )
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra flag for the server started here (repeatable)"
    )
    p.add_argument("--max-rss-growth-mib", type=float, help="fail when RSS grew more than this after the warm-up")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1 or args.interval <= 0:
        p.error("--duration and --interval must be positive, --concurrency at least 1")
    args.warmup = min(args.warmup, args.duration / 2)

    images = folder_images(args.images, 64) if args.images else synthetic_images(16)
    server = None
    with tempfile.TemporaryDirectory(prefix="bitmoji-soak-") as tmp:
        if args.target:
            target, pid = args.target, args.pid
        else:
            model = args.model or export_default_model(Path(tmp))
            server = Server(model, args.server_arg)
            target, pid = server.target, server.proc.pid
        print(
            f"soak: {args.concurrency} callers for {args.duration:g} s against {target}"
            f"{f' (server pid {pid})' if pid else ''}; progress every {args.interval:g} s",
            flush=True,
        )
        try:
            result = asyncio.run(soak(args, target, pid, images))
        finally:
            exit_code = server.stop() if server else None
    result["server_exit_code"] = exit_code
    result["server_error_lines"] = server.error_lines()[:20] if server else []
    ok = result["error_count"] == 0 and exit_code in (None, 0) and not result["server_error_lines"]
    if args.max_rss_growth_mib is not None and (result["rss_growth_mib"] or 0) > args.max_rss_growth_mib:
        ok = False
    growth = (
        "n/a"
        if result["rss_growth_mib"] is None
        else (
            f"{result['rss_start_mib']:.1f} -> {result['rss_end_mib']:.1f} MiB ({result['rss_growth_mib']:+.1f} MiB, "
            f"{result['rss_slope_mib_per_min']:+.2f} MiB/min)"
        )
    )
    print(
        f"soak: {result['calls']} calls, {result['error_count']} errors {result['errors'] or ''}; "
        f"server RSS after warm-up {growth}; "
        f"server exit {exit_code if exit_code is not None else 'n/a'}; {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    for line in result["server_error_lines"]:
        print(f"soak: server: {line.rstrip()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
