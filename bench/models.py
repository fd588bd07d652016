"""Two models on one server: each alone, then both at once, side by side; and what each loaded version costs in memory.

One server serves a repository of the MLP and the CNN (each its own batcher
and model threads). Each model is loaded with `--concurrency` callers alone,
then both at once with half the callers each, `--rounds` times in turn. A
server that shares its cores well gives each model at least its share when
both run: together/alone >= about 0.5 for each, and the two ratios add up to
about 1 or more (the cores stay busy). Also reported: the resident memory each
loaded version added (bitmoji_model_memory_bytes), and the server's RSS.

    python -m bench.models --rounds 2 --duration 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from pathlib import Path

from bench.common import export_model, loadavg, machine, progress, real_images, start_server, write_json
from bench.load import auto_procs, run_level

MODELS = ("mlp", "cnn")


def requests_for(model: str, images: list[bytes]) -> list[bytes]:
    from bitmoji.v1 import classifier_pb2 as pb

    return [pb.ClassifyRequest(inputs=[pb.Input(image=b)], model_name=model).SerializeToString() for b in images]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_per_version(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(server.metrics_text()):
        for s in family.samples:
            if s.name == "bitmoji_model_memory_bytes":
                out[f"{s.labels['model']} v{s.labels['version']}"] = round(s.value / 2**20, 1)
    return out


def run(*, rounds: int = 2, concurrency: int = 32, duration: float = 5.0, warmup: float = 1.0, data=None) -> dict:
    images = real_images(data, 8)
    requests = {m: requests_for(m, images) for m in MODELS}
    alone: dict[str, list[float]] = {m: [] for m in MODELS}
    together: dict[str, list[float]] = {m: [] for m in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repository"
        for model in MODELS:
            (root / model / "1").mkdir(parents=True)
            export_model(model, tmp).rename(root / model / "1" / "model.pt")
        with start_server(root, [], repository=True) as server:
            memory = memory_per_version(server)
            rss = rss_mib(server.pid)
            for r in range(rounds):
                for model in MODELS:
                    progress(f"models: round {r + 1}/{rounds}, {model} alone, {concurrency} callers...")
                    row = run_level(server.target, requests[model], concurrency, duration=duration, warmup=warmup,
                                    procs=auto_procs(concurrency))  # fmt: skip
                    alone[model].append(row["images_per_s"])
                    progress(f"  {row['images_per_s']:.0f} img/s")
                progress(f"models: round {r + 1}/{rounds}, both at once, {concurrency // 2} callers each...")
                rows: dict[str, dict] = {}

                def load(model: str, rows: dict = rows) -> None:
                    rows[model] = run_level(server.target, requests[model], concurrency // 2, duration=duration,
                                            warmup=warmup, procs=1)  # fmt: skip

                threads = [threading.Thread(target=load, args=(m,)) for m in MODELS]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                for model in MODELS:
                    together[model].append(rows[model]["images_per_s"])
                progress("  " + ", ".join(f"{m} {rows[m]['images_per_s']:.0f} img/s" for m in MODELS))
    ratios = {m: [t / a for t, a in zip(together[m], alone[m], strict=True)] for m in MODELS}
    return {
        "benchmark": "models",
        "machine": machine(),
        "concurrency": concurrency,
        "rounds": rounds,
        "duration_s": duration,
        "alone_images_per_s": alone,
        "together_images_per_s": together,
        "together_over_alone": {m: [round(x, 3) for x in v] for m, v in ratios.items()},
        "median_ratio": {m: round(statistics.median(v), 3) for m, v in ratios.items()},
        "sum_of_median_ratios": round(sum(statistics.median(v) for v in ratios.values()), 3),
        "memory_mib_per_version": memory,
        "server_rss_mib": round(rss, 1),
        "loadavg_end": loadavg(),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=2, help="times each configuration runs, in turn (default 2)")
    p.add_argument(
        "--concurrency", type=int, default=32, help="callers (split in two when both models run; default 32)"
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run (default 1)")
    p.add_argument("--data", default=None, help="real bitmoji folder (default ../shared/data/bitmoji)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    result = run(
        rounds=args.rounds, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup, data=args.data
    )
    for model in MODELS:
        alone, together = result["alone_images_per_s"][model], result["together_images_per_s"][model]
        print(
            f"{model}: alone {alone}, together {together} img/s; together/alone {result['together_over_alone'][model]}"
        )
    print(f"sum of the median ratios: {result['sum_of_median_ratios']} (1: the cores stay as busy as with one model)")
    memory = result["memory_mib_per_version"]
    print(f"memory per loaded version (MiB): {memory}; server RSS {result['server_rss_mib']} MiB")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
