"""The in-process limit: what this machine can do with no server at all (the ceiling the server is held to).

Measured on one 128x128 PNG of the real bitmoji set per image (rotating
through a few), with the project's own preprocessing (`bitmoji.core.preprocess.load_image`)
and a TorchScript model exported as the trainer does:

- decode:            decode + preprocess alone, one thread (ms per image), and in N processes (img/s);
- forward:           uint8->float + forward alone at batch B, torch threads 1 and N (img/s);
- decode+forward:    decode B images, stack, forward, in one process, one thread;
- decode+forward xN: the same in N processes with one thread each: the real ceiling
                     (issue 4: the server must reach 0.8x of it at concurrency 32 and 64);
- decode+forward threads xN: N threads of one process, one torch thread each (what a
                     one-process server can hope for, GIL included).

N = the cores this process may use. Beside the wall-clock rate, each row has the CPU time
per image (a busy shared machine distorts it far less): N idle cores would do about
N / that many images a second (`ceiling_idle_estimate_images_per_s`). Every loop runs for --duration seconds after a
warm-up; processes start together (a barrier) so they really share the cores.

    python -m bench.inprocess --model mlp --duration 5 --json bench/results/inprocess.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import threading
import time

from bench.common import export_model, images_source, loadavg, machine, progress, real_images, write_json
from bitmoji.server.config import cpu_count


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def _load(model_path: str):
    from bitmoji.core.modelfile import load_model

    return load_model(model_path, "cpu").module


def _run_for(duration: float, step) -> tuple[int, float, float]:
    """Call step() (returns images done) until `duration` s passed;
    -> (images, seconds, CPU seconds of this process).
    """
    n = 0
    cpu = time.process_time()
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        n += step()
        now = time.perf_counter()
    return n, now - start, time.process_time() - cpu


def _make_step(kind: str, model_path: str | None, images: list[bytes], batch: int):
    import torch

    from bitmoji.core.preprocess import load_image, to_model_input

    counter = {"i": 0}

    def next_images(k: int) -> list[bytes]:
        i = counter["i"]
        counter["i"] = (i + k) % len(images)
        return [images[(i + j) % len(images)] for j in range(k)]

    if kind == "decode":

        def step():
            load_image(next_images(1)[0])
            return 1

        return step
    module = _load(model_path)
    if kind == "forward":
        x = torch.stack([load_image(b) for b in next_images(batch)])

        def step():
            with torch.inference_mode():
                module(to_model_input(x))
            return batch

        return step
    if kind == "decode+forward":

        def step():
            x = torch.stack([load_image(b) for b in next_images(batch)])
            with torch.inference_mode():
                module(to_model_input(x))
            return batch

        return step
    raise ValueError(kind)


def _worker(model_path, images, batch, barrier, tasks, results):
    """A persistent one-thread process: for each (kind, duration, warmup) task, warm up, wait for all, run, report."""
    _setup(1)
    steps = {}
    results.put("ready")
    while (task := tasks.get()) is not None:
        kind, duration, warmup = task
        try:
            if kind not in steps:
                steps[kind] = _make_step(kind, model_path, images, batch)
            _run_for(warmup, steps[kind])
        except Exception as exc:  # report, and still meet the others at the barrier
            barrier.wait()
            results.put(f"{type(exc).__name__}: {exc}")
            continue
        barrier.wait()
        results.put(_run_for(duration, steps[kind]))


class Workers:
    """N spawned one-thread processes, started once (importing torch costs seconds) and reused for every measurement."""

    def __init__(self, n: int, model_path, images, batch):
        ctx = mp.get_context("spawn")
        self.n = n
        self._ctx = ctx
        self._tasks = ctx.Queue()
        self._results = ctx.Queue()
        barrier = ctx.Barrier(n)  # cyclic: one for every measurement
        self._procs = [
            ctx.Process(
                target=_worker, args=(model_path, images, batch, barrier, self._tasks, self._results), daemon=True
            )
            for _ in range(n)
        ]
        for p in self._procs:
            p.start()
        for _ in self._procs:
            self._results.get(timeout=300)

    def run(self, kind: str, duration: float, warmup: float) -> list[tuple[int, float]]:
        for _ in range(self.n):
            self._tasks.put((kind, duration, warmup))
        parts = [self._results.get(timeout=duration + warmup + 120) for _ in range(self.n)]
        errors = [p for p in parts if isinstance(p, str)]
        if errors:
            raise RuntimeError(f"worker failed: {errors[0]}")
        return parts

    def close(self) -> None:
        for _ in self._procs:
            self._tasks.put(None)
        for p in self._procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def in_processes(kind: str, workers: Workers, model_path, images, batch, duration, warmup) -> dict:
    parts = workers.run(kind, duration, warmup)
    return {
        "images_per_s": sum(n_ / s for n_, s, _ in parts),
        "processes": workers.n,
        "threads_each": 1,
        "per_process": [n_ / s for n_, s, _ in parts],
        "cpu_ms_per_image": 1000 * sum(c for *_, c in parts) / sum(n_ for n_, *_ in parts),
    }


def in_threads(kind: str, n: int, model_path, images, batch, duration, warmup) -> dict:
    """n threads of this process, one torch thread in all (torch's thread count is per process)."""
    torch = _setup(1)
    steps = [_make_step(kind, model_path, images[i::n] or images, batch) for i in range(n)]
    results: list = [None] * n
    barrier = threading.Barrier(n)
    cpu = {}

    def run(i):
        _run_for(warmup, steps[i])
        if barrier.wait() == 0:
            cpu["start"] = time.process_time()
        results[i] = _run_for(duration, steps[i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    del torch
    images_done = sum(n_ for n_, *_ in results)
    return {
        "images_per_s": sum(n_ / s for n_, s, _ in results),
        "threads": n,
        "cpu_ms_per_image": 1000 * (time.process_time() - cpu["start"]) / images_done,
    }


def in_this_process(kind: str, threads: int, model_path, images, batch, duration, warmup) -> dict:
    _setup(threads)
    step = _make_step(kind, model_path, images, batch)
    _run_for(warmup, step)
    n, seconds, cpu = _run_for(duration, step)
    return {
        "images_per_s": n / seconds,
        "ms_per_image": 1000 * seconds / n,
        "cpu_ms_per_image": 1000 * cpu / n,
        "torch_threads": threads,
    }


def run(
    model_path: str,
    images: list[bytes],
    *,
    batch: int = 64,
    duration: float = 3.0,
    warmup: float = 0.5,
    processes: int | None = None,
) -> dict:
    n = processes or cpu_count()
    rows = {}

    def measure(name, fn, *args):
        progress(f"inprocess: {name} ({duration:g} s)...")
        rows[name] = fn(*args, model_path, images, batch, duration, warmup)
        rows[name]["loadavg"] = loadavg()
        progress(
            f"  {name}: {rows[name]['images_per_s']:.0f} img/s, {rows[name]['cpu_ms_per_image']:.3f} CPU ms per image"
        )

    progress(f"inprocess: starting {n} worker processes...")
    workers = Workers(n, model_path, images, batch)
    try:
        measure("decode_1thread", in_this_process, "decode", 1)
        measure(f"decode_{n}proc", in_processes, "decode", workers)
        measure("forward_1thread", in_this_process, "forward", 1)
        measure("decode_forward_1proc", in_this_process, "decode+forward", 1)
        measure(f"decode_forward_{n}threads", in_threads, "decode+forward", n)
        measure(f"decode_forward_{n}proc", in_processes, "decode+forward", workers)
        if n > 1:
            # last: once torch's OpenMP pool has n threads it stays so in this process
            measure(f"forward_{n}threads", in_this_process, "forward", n)
    finally:
        workers.close()
    ceiling = rows[f"decode_forward_{n}proc"]["images_per_s"]
    # CPU time per image is what a busy shared machine distorts least:
    # n idle cores would do n / cpu_time images a second
    cpu_ms = rows[f"decode_forward_{n}proc"]["cpu_ms_per_image"]
    return {
        "benchmark": "inprocess",
        "model": str(model_path),
        "batch": batch,
        "duration_s": duration,
        "cores": n,
        "images": images_source(),
        "rows": rows,
        "ceiling_images_per_s": ceiling,
        "ceiling_cpu_ms_per_image": cpu_ms,
        "ceiling_idle_estimate_images_per_s": n * 1000 / cpu_ms,
        "decode_ms_per_image": rows["decode_1thread"]["ms_per_image"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.inprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="mlp", help="a TorchScript model file, or mlp/cnn to export an untrained one (default mlp)"
    )
    p.add_argument("--data", default=None, help="the real bitmoji set (default ../shared/data/bitmoji)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement, after the warm-up")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--processes", type=int, default=None, help="default: the cores")
    p.add_argument("--quick", action="store_true", help="--duration 0.5 --warmup 0.2")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 0.5, 0.2
    images = real_images(args.data, 16)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model if args.model not in ("mlp", "cnn") else str(export_model(args.model, tmp))
        result = run(
            model, images, batch=args.batch, duration=args.duration, warmup=args.warmup, processes=args.processes
        )
    result["machine"] = machine()
    result["model_name"] = args.model
    print(
        f"decode {result['decode_ms_per_image']:.2f} ms/image on one thread; ceiling (decode+forward, "
        f"{result['cores']} one-thread processes) {result['ceiling_images_per_s']:.0f} img/s; loadavg {loadavg()}"
    )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
