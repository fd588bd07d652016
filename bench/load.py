"""The server under a bounded loopback load: throughput and latency at several concurrency levels.

The load generator runs in processes of its own (never the server's), and is
made cheap per call so it leaves the CPU to the server: grpc.aio, one
coroutine per concurrent caller, several channels (TCP connections) per
process (8 by default: `--workers` spreads connections, not calls, over its
processes, and with 2 connections both landed on one worker half the time), and requests
serialised once (the generic `unary_unary` with no serialisers sends the
pre-encoded bytes as they are, and hands back the response bytes unparsed).
Each call carries one 128x128 PNG of the real bitmoji set, rotating through a few.

Per level: a warm-up, then a fixed measuring window; throughput = calls
completed in the window / its length; latency percentiles of those calls;
errors by status code; the CPU the generator and the server used in the window
(in cores: 1.0 = one core busy all the time); and, from the server's
/metrics, the mean batch size and the per-stage times (decode, queue wait, forward,
protobuf parse and serialisation).

    python -m bench.load --model mlp --concurrency 1,8,32,64 --duration 5
    python -m bench.load --target 127.0.0.1:50051 --concurrency 32
    python -m bench.load --model mlp --server-arg=--torch-threads=1 --server-arg=--decode-workers=1

Every call is bounded (a deadline), every level is bounded in time; the
server it starts listens on 127.0.0.1 only and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import tempfile
import time
from collections import Counter

from bench.common import (
    CLASSIFY,
    classify_request,
    export_model,
    images_source,
    loadavg,
    machine,
    percentiles,
    proc_cpu_seconds,
    progress,
    real_images,
    start_server,
    write_json,
)
from bitmoji.server.config import cpu_count

DEFAULT_LEVELS = (1, 8, 32, 64)
CALL_TIMEOUT_S = 10.0
DEFAULT_CHANNELS = 8  # per generator process; see the module docstring


# -- the generator (runs in its own process) -------------------------------------


async def _generate(
    target: str,
    requests: list[bytes],
    concurrency: int,
    channels: int,
    start_at: float,
    warmup: float,
    duration: float,
    first: int,
    method: str,
) -> dict:
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    try:
        for ch in chans:
            await asyncio.wait_for(ch.channel_ready(), 30)
        calls = [ch.unary_unary(method) for ch in chans]  # bytes in, bytes out: no protobuf work per call
        latencies: list[float] = []
        errors: Counter = Counter()
        # every generator process starts at the same wall-clock time
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.perf_counter()
        window_start, window_end = t0 + warmup, t0 + warmup + duration
        cpu: dict = {}

        async def clock():
            await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
            cpu["start"] = _self_cpu()
            await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
            cpu["end"] = _self_cpu()

        async def caller(k: int):
            call = calls[k % channels]
            i = first + k
            n = len(requests)
            perf = time.perf_counter
            while True:
                start = perf()
                if start >= window_end:
                    return
                code = None
                try:
                    await call(requests[i % n], timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                end = perf()
                if window_start <= end <= window_end:
                    if code is None:
                        latencies.append((end - start) * 1000.0)
                    else:
                        errors[code] += 1
                i += concurrency

        await asyncio.gather(clock(), *(caller(k) for k in range(concurrency)))
        return {"latencies_ms": latencies, "errors": dict(errors), "cpu_s": cpu["end"] - cpu["start"]}
    finally:
        for ch in chans:
            await ch.close()


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _generator_main(args, queue) -> None:
    try:
        queue.put(asyncio.run(_generate(*args)))
    except BaseException as exc:  # report, never hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_level(
    target: str,
    requests: list[bytes],
    concurrency: int,
    *,
    duration: float,
    warmup: float,
    procs: int = 1,
    channels: int = DEFAULT_CHANNELS,
    server_pids: list[int] = (),
    method: str = CLASSIFY,
) -> dict:
    """One concurrency level with `procs` generator processes; -> throughput, latency, errors, CPU.

    `requests` are serialised messages for the unary `method` (Classify's by default; another server's for comparisons).
    """
    procs = max(1, min(procs, concurrency))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 1.5 + 0.5 * procs  # time for the processes to start and connect
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    workers = []
    for i, share in enumerate(shares):
        args = (target, requests, share, max(1, min(channels, share)), start_at, warmup, duration, i, method)
        workers.append(ctx.Process(target=_generator_main, args=(args, queue), daemon=True))
    for w in workers:
        w.start()
    server_cpu = None
    try:
        if server_pids:
            time.sleep(max(0.0, start_at + warmup - time.time()))
            c0 = sum(proc_cpu_seconds(pid) for pid in server_pids)
            time.sleep(max(0.0, start_at + warmup + duration - time.time()))
            server_cpu = (sum(proc_cpu_seconds(pid) for pid in server_pids) - c0) / duration
        parts = [
            queue.get(timeout=max(0.0, start_at - time.time()) + warmup + duration + CALL_TIMEOUT_S + 60)
            for _ in workers
        ]
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    failed = [p["error"] for p in parts if "error" in p]
    if failed:
        raise RuntimeError(f"load generator failed: {failed[0]}")
    latencies = [x for p in parts for x in p["latencies_ms"]]
    errors: Counter = Counter()
    for p in parts:
        errors.update(p["errors"])
    return {
        "concurrency": concurrency,
        "generator_processes": procs,
        "channels_per_process": max(1, min(channels, shares[0])),
        "calls": len(latencies),
        "images_per_s": len(latencies) / duration,  # one image per call
        **percentiles(latencies),
        "max": max(latencies) if latencies else None,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "generator_cpu_cores": sum(p["cpu_s"] for p in parts) / duration,
        "server_cpu_cores": server_cpu,
        # CPU per image, server and generator: what a busy shared machine distorts least (see BENCHMARKS.md)
        "server_cpu_ms_per_image": (1000 * server_cpu * duration / len(latencies))
        if latencies and server_cpu is not None
        else None,
        "generator_cpu_ms_per_image": (1000 * sum(p["cpu_s"] for p in parts) / len(latencies)) if latencies else None,
        "loadavg": loadavg(),
    }


# -- the server's own view (its /metrics) ------------------------------------------


def scrape(server) -> dict:
    """Sums and counts of the server's histograms (for deltas between two scrapes); {} without a server or metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    text = server.metrics_text() if server is not None else ""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")) and family.name.startswith("bitmoji_"):
                if s.labels.get("method") not in (None, "Classify"):
                    continue
                key = s.name + (f"/{s.labels['direction']}" if "direction" in s.labels else "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def stage_means(before: dict, after: dict) -> dict:
    """Mean per-stage figures over a level, from two scrapes."""

    def mean(name: str, scale: float = 1000.0, direction: str = ""):
        count, total = f"{name}_count{direction}", f"{name}_sum{direction}"
        n = after.get(count, 0) - before.get(count, 0)
        s = after.get(total, 0) - before.get(total, 0)
        return (s / n * scale) if n else None

    return {
        "mean_batch_size": mean("bitmoji_batch_size", 1.0),
        "decode_ms": mean("bitmoji_preprocess_duration_seconds"),
        "queue_wait_ms": mean("bitmoji_queue_wait_seconds"),
        "forward_ms_per_batch": mean("bitmoji_forward_duration_seconds"),
        "server_request_ms": mean("bitmoji_request_duration_seconds"),
        "parse_ms": mean("bitmoji_serialization_duration_seconds", direction="/request"),
        "serialize_ms": mean("bitmoji_serialization_duration_seconds", direction="/response"),
    }


def check_target(target: str, image: bytes) -> dict:
    """One real Classify through the generated stubs: the server answers what we think it answers."""
    import grpc

    from bitmoji.v1 import classifier_pb2 as pb
    from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        response = stub.Classify(pb.ClassifyRequest(inputs=[pb.Input(image=image)]), timeout=30)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    if len(response.predictions) != 1:
        raise RuntimeError(f"expected one prediction, got {len(response.predictions)}")
    return {
        "model_version": response.model_version,
        "architecture": info.architecture,
        "max_batch_size": info.max_batch_size,
        "max_batch_delay_ms": info.max_batch_delay_ms,
        "torch_threads": info.torch_threads,
    }


def auto_procs(concurrency: int) -> int:
    """Generator processes: one is enough below 64 concurrent calls (it used 0.12-0.2 core at 32 here), two from 64."""
    return 2 if concurrency >= 64 else 1


def run(
    levels=DEFAULT_LEVELS,
    *,
    model: str | None = None,
    target: str | None = None,
    duration: float = 5.0,
    warmup: float = 1.0,
    n_images: int = 8,
    data=None,
    procs: int | None = None,
    channels: int = DEFAULT_CHANNELS,
    server_args: list[str] = (),
    server_cwd: str | None = None,
    label: str | None = None,
) -> dict:
    """Start the server (or use `target`) and run every level (`--server-arg=--workers=2`: two server processes)."""
    images = real_images(data, n_images)
    requests = [classify_request(b) for b in images]
    server = None  # the one this benchmark started, if any
    tmp = None
    try:
        if target is None:
            if model in (None, "mlp", "cnn"):
                tmp = tempfile.TemporaryDirectory()
                model = str(export_model(model or "mlp", tmp.name))
            progress(f"load: starting the server on {model} {' '.join(server_args)}")
            server = start_server(model, list(server_args), cwd=server_cwd)
            target = server.target
        info = check_target(target, images[0])
        rows = []
        for c in levels:
            p = procs or auto_procs(c)
            progress(f"load: concurrency {c} ({p} generator process(es)), {warmup:g} s warm-up + {duration:g} s...")
            before = scrape(server)
            row = run_level(
                target,
                requests,
                c,
                duration=duration,
                warmup=warmup,
                procs=p,
                channels=channels,
                server_pids=[server.pid] if server else [],
            )
            row.update(stage_means(before, scrape(server)))
            rows.append(row)
            progress(
                f"  {row['images_per_s']:.0f} img/s, p50 {_ms(row['p50'])}, p99 {_ms(row['p99'])}, "
                f"errors {row['error_count']}, "
                f"batch {_f(row['mean_batch_size'])}, generator {row['generator_cpu_cores']:.2f} cores, "
                f"server {_f(row['server_cpu_cores'])} cores ({_f(row['server_cpu_ms_per_image'], '.3f')} CPU ms/img), "
                f"loadavg {row['loadavg']}"
            )
        return {
            "benchmark": "load",
            "label": label or " ".join(server_args) or "default flags",
            "target": target if server is None else "started by the benchmark",
            "model": model,
            "server_args": list(server_args),
            "server_cwd": server_cwd,
            "server_ready_s": server.ready_s if server else None,
            "server": info,
            "duration_s": duration,
            "warmup_s": warmup,
            "images": images_source(data),
            "n_images": len(images),
            "image_bytes_mean": sum(map(len, images)) / len(images),
            "rows": rows,
        }
    finally:
        if server is not None:
            code = server.stop()
            if code not in (0, None):
                progress(f"load: the server exited with {code}:\n{''.join(server.log[-20:])}")
        if tmp is not None:
            tmp.cleanup()


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def _f(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", default=None, help="model file to serve, or mlp/cnn to export an untrained one (default mlp)"
    )
    src.add_argument("--target", default=None, help="load an already running server at HOST:PORT instead")
    p.add_argument(
        "--concurrency", default=",".join(map(str, DEFAULT_LEVELS)), help="comma-separated levels (default 1,8,32,64)"
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per level, after the warm-up")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--images", type=int, default=8, help="distinct real images to rotate through")
    p.add_argument("--data", default=None, help="the real bitmoji set (default ../shared/data/bitmoji)")
    p.add_argument("--procs", type=int, default=None, help="generator processes (default 1, 2 from concurrency 64)")
    p.add_argument(
        "--channels",
        type=int,
        default=DEFAULT_CHANNELS,
        help="channels (TCP connections) per generator process (default %(default)s)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="a flag for the server (repeat), e.g. --server-arg=--torch-threads=1",
    )
    p.add_argument(
        "--server-cwd",
        default=None,
        help="run `python -m bitmoji.server` from this directory (a patched copy, for experiments)",
    )
    p.add_argument("--quick", action="store_true", help="--duration 1 --warmup 0.3")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 1.0, 0.3
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    result = run(
        levels,
        model=args.model,
        target=args.target,
        duration=args.duration,
        warmup=args.warmup,
        n_images=args.images,
        data=args.data,
        procs=args.procs,
        channels=args.channels,
        server_args=args.server_arg,
        server_cwd=args.server_cwd,
    )
    result["machine"] = machine()
    print(
        f"{'conc':>5} {'img/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6} "
        f"{'batch':>6} {'gen cpu':>7} {'srv cpu':>7} {'srv cpu ms/img':>14}"
    )
    for r in result["rows"]:
        print(
            f"{r['concurrency']:>5} {r['images_per_s']:>8.0f} {r['p50'] or 0:>8.2f} "
            f"{r['p90'] or 0:>8.2f} {r['p99'] or 0:>8.2f} "
            f"{r['error_count']:>6} {_f(r['mean_batch_size']):>6} {r['generator_cpu_cores']:>7.2f} "
            f"{_f(r['server_cpu_cores']):>7} {_f(r['server_cpu_ms_per_image'], '.3f'):>14}"
        )
    print(f"loadavg {loadavg()} on {cpu_count()} cores")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
