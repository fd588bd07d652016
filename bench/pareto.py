"""Accuracy against cost, one point per architecture (and int8): the trade-off behind the default `--arch cnn`.

For each candidate the project's trainer trains it with its own recipe on the
real data (or `--models DIR` reuses DIR/<arch>/seed<S>/model.pt), then:

  accuracy     the exported file on the validation images (mean and min over --seeds)
  params, MACs parameters; multiply-adds for one image (counted by hooks on every Conv2d and Linear)
  CPU ms/img   the forward pass as the server runs it (frozen + optimized when that pays, the server's own
               choice), one thread, at batch 1 and 32, same run for every candidate
  served img/s one server (default flags) on the file, 32 callers, one PNG per call

`cnn-int8` is the trained cnn after post-training static int8 quantization
(torch.ao eager mode, x86 engine, calibrated on 512 training images): a point
on the plot, not a shipped format. Its module has no gradients, so GradientProbe
could not run on it, and torch.ao.quantization is deprecated in 2.14.

Writes bench/results/pareto.json and pareto.png (accuracy against served img/s).

    python -m bench.pareto                          # mlp, vgg (seed 0), cnn (seeds 0, 1, 2): ~12 min on 2 idle cores
    python -m bench.pareto --seeds 0,1,2            # mlp and vgg over three seeds too
    python -m bench.pareto --models runs/pareto     # keep (and reuse) the trained files there
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import DEFAULT_DATA, RESULTS, loadavg, machine, progress, write_json

ARCHES = ("mlp", "cnn", "vgg")
INT8 = "cnn-int8"
CALIBRATION_IMAGES = 512


def count_macs(module, example) -> int:
    """Multiply-adds of one forward pass of `example` [1, ...] through every Conv2d and Linear of an eager module."""
    import torch
    from torch import nn

    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            per_output = (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
            total += output.numel() * per_output
        else:
            total += layer.in_features * layer.out_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            module.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return total


def train(arch: str, seed: int, data: Path, out: Path, epochs: int | None = None) -> tuple[Path, float | None]:
    """The file `bitmoji-train fit --arch ARCH --seed SEED` exports (reused when already there), and the
    seconds the training took (None when reused)."""
    from bitmoji.trainer.train import TrainConfig, fit

    path = out / arch / f"seed{seed}" / "model.pt"
    if path.is_file():
        progress(f"pareto: reusing {path}")
        return path, None
    progress(f"pareto: training {arch}, seed {seed} (its recipe's defaults)")
    result = fit(TrainConfig(data=str(data), out=str(path.parent), arch=arch, seed=seed, epochs=epochs, progress=False))
    return path, result.seconds


def accuracy(module, valid) -> float:
    """Validation accuracy as `bitmoji-train fit` reports it (its own `evaluate`), on CPU."""
    import torch

    from bitmoji.trainer.train import evaluate

    return evaluate(module, valid, torch.device("cpu"))[1]


@contextlib.contextmanager
def _quiet_quantization():
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices: this is a measurement
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=".*quant.*")
        yield


def quantize_int8(float_file: Path, train_images, out: Path) -> Path:
    """The float CNN file -> an int8 TorchScript file with the same metadata (Classify-only)."""
    import torch
    from torch import nn
    from torch.ao import quantization as tq

    from bitmoji.core.modelfile import METADATA_FILE, load_model, quiet_torchscript, script
    from bitmoji.trainer.models import build_model

    loaded = load_model(float_file)
    net = build_model("cnn")
    net.load_state_dict(loaded.module.state_dict())

    class Quantized(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.quant, self.net, self.dequant = tq.QuantStub(), net, tq.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.net(self.quant(x)))

    with _quiet_quantization():
        torch.backends.quantized.engine = "x86"
        model = Quantized(net).eval()
        for m in model.modules():  # fuse every Conv2d -> BatchNorm2d (-> ReLU) in place
            if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d) and isinstance(m[1], nn.BatchNorm2d):
                tq.fuse_modules(m, [["0", "1", "2"] if isinstance(m[2], nn.ReLU) else ["0", "1"]], inplace=True)
        model.qconfig = tq.get_default_qconfig("x86")
        tq.prepare(model, inplace=True)
        with torch.inference_mode():
            for start in range(0, min(CALIBRATION_IMAGES, len(train_images)), 64):
                model(train_images.batch(torch.arange(start, min(start + 64, len(train_images))))[0])
        tq.convert(model, inplace=True)
        scripted = script(model)
    metadata = {**loaded.metadata, "architecture": INT8, "model_version": loaded.metadata["model_version"] + "-int8"}
    path = out / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_torchscript():
        torch.jit.save(scripted, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})
    return path


def forward_cpu_ms(paths: dict[str, Path], images, target_s: float, rounds: int = 5) -> dict[str, dict]:
    """CPU ms per image of the forward pass the server would run (its own optimize choice), one thread.

    Per candidate and batch size (1 and 32), the least of `rounds` measurements taken in turn: a shared box's
    other work lands on some rounds, and interleaving keeps it from landing on one candidate only, so the
    ratios between candidates hold.
    """
    from bitmoji.core.limits import DEFAULT_MAX_PIXELS
    from bitmoji.core.modelfile import load_model
    from bitmoji.server.model import ServedModel

    served = {}
    with _quiet_quantization():
        for name, path in paths.items():
            model, how = ServedModel.create(load_model(path), max_pixels=DEFAULT_MAX_PIXELS).optimized(32)
            served[name] = (model, how)
            for batch in (1, 32):
                model.predict(images[:batch])
        best = {(name, batch): float("inf") for name in paths for batch in (1, 32)}
        for _ in range(rounds):
            for name, (model, _how) in served.items():
                for batch in (1, 32):
                    x = images[:batch]
                    runs, cpu = 0, time.process_time()
                    deadline = time.perf_counter() + target_s / rounds
                    while runs < 3 or time.perf_counter() < deadline:
                        model.predict(x)
                        runs += 1
                    ms = 1000 * (time.process_time() - cpu) / (runs * batch)
                    best[name, batch] = min(best[name, batch], ms)
    return {name: {"b1": best[name, 1], "b32": best[name, 32], "forward": how} for name, (_m, how) in served.items()}


def served_images_per_s(path: Path, concurrency: int, duration: float, warmup: float, data: Path) -> dict:
    from bench import load

    row = load.run([concurrency], model=str(path), duration=duration, warmup=warmup, data=data)["rows"][0]
    return {k: row.get(k) for k in ("images_per_s", "p50", "p99", "error_count", "server_cpu_ms_per_image")}


def run(
    *,
    data: Path = DEFAULT_DATA,
    seeds=(0,),
    cnn_seeds=(0, 1, 2),
    arches=ARCHES,
    int8: bool = True,
    models: Path | None = None,
    concurrency: int = 32,
    duration: float = 8.0,
    warmup: float = 2.0,
    target_s: float = 2.0,
    epochs: int | None = None,
) -> dict:
    """Train (or reuse) and measure every candidate; `epochs` overrides the recipes (smoke runs only)."""
    import torch

    from bitmoji.core.modelfile import load_model
    from bitmoji.trainer.data import load_dataset
    from bitmoji.trainer.models import build_model

    if not (Path(data) / "train").is_dir():
        raise FileNotFoundError(f"pareto needs the real data set ({data}/train)")
    result: dict = {
        "benchmark": "pareto",
        "machine": machine(),
        "data": str(data),
        "seeds": list(seeds),
        "cnn_seeds": list(cnn_seeds),
        "epochs": epochs or "each recipe's",
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(models) if models else Path(tmp)
        trained = {
            arch: [train(arch, seed, data, root, epochs) for seed in (cnn_seeds if arch == "cnn" else seeds)]
            for arch in arches
        }
        files = {arch: [path for path, _ in runs] for arch, runs in trained.items()}
        train_seconds = {arch: [t for _, t in runs] for arch, runs in trained.items()}
        train_set, valid = load_dataset(data, progress=False)
        if int8 and "cnn" in files:
            files[INT8] = [quantize_int8(f, train_set, f.parent / "int8") for f in files["cnn"]]
        images = valid.images[torch.arange(32) % len(valid)]  # batch 32, repeating a small set
        torch.set_num_threads(1)  # the cost of the forward pass itself: one core, as each server model thread
        progress(f"pareto: forward cost of {', '.join(files)}, batch 1 and 32, interleaved")
        costs = forward_cpu_ms({name: paths[0] for name, paths in files.items()}, images, target_s)
        for name, paths in files.items():
            progress(f"pareto: measuring {name}")
            with _quiet_quantization():
                accuracies = [accuracy(load_model(p).module, valid) for p in paths]
                agreement = None
                if name == INT8:  # label agreement with the float file it came from, seed by seed
                    agree = []
                    for q, f in zip(paths, files["cnn"], strict=True):
                        with torch.inference_mode():
                            x = valid.batch(torch.arange(len(valid)))[0]
                            agree.append(
                                float(((load_model(q).module(x) > 0) == (load_model(f).module(x) > 0)).float().mean())
                            )
                    agreement = statistics.mean(agree)
            eager = build_model("cnn" if name == INT8 else name)
            params = sum(p.numel() for p in eager.parameters())
            macs = count_macs(eager, torch.zeros(1, 3, 128, 128))
            b1, b32 = costs[name]["b1"], costs[name]["b32"]
            progress(
                f"  accuracy {accuracies}, {params:,} params, {macs / 1e6:.1f}M MACs, {b1:.3f} / {b32:.3f} CPU ms/img"
            )
            served = served_images_per_s(paths[0], concurrency, duration, warmup, data)
            progress(f"  served {served['images_per_s']:.0f} img/s at {concurrency} callers")
            result["rows"].append(
                {
                    "name": name,
                    "accuracy_mean": statistics.mean(accuracies),
                    "accuracy_min": min(accuracies),
                    "accuracies": accuracies,
                    "train_seconds": train_seconds.get(name),
                    "int8_label_agreement": agreement,
                    "params": params,
                    "macs": macs,
                    "cpu_ms_per_image_b1": b1,
                    "cpu_ms_per_image_b32": b32,
                    "forward": costs[name]["forward"],
                    "served": served,
                    "loadavg": loadavg(),
                }
            )
    result["concurrency"] = concurrency
    return result


def pareto_front(rows: list[dict]) -> set[str]:
    """Names no other row beats on both accuracy and served img/s."""
    front = set()
    for r in rows:
        a, s = r["accuracy_mean"], r["served"]["images_per_s"]
        if not any(
            o is not r
            and o["accuracy_mean"] >= a
            and o["served"]["images_per_s"] >= s
            and (o["accuracy_mean"] > a or o["served"]["images_per_s"] > s)
            for o in rows
        ):
            front.add(r["name"])
    return front


def markdown(r: dict) -> list[str]:
    rows = r["rows"]
    by = {row["name"]: row for row in rows}
    seeds, cnn_seeds = ",".join(map(str, r["seeds"])), ",".join(map(str, r["cnn_seeds"]))
    L = [
        f"`{r.get('command', 'python -m bench.pareto')}`: each architecture trained with its recipe on the real data "
        f"(seeds {cnn_seeds} for the cnn and its int8 copy, {seeds} for the others), accuracy on the validation "
        "images (mean / min over the seeds); CPU ms per image of the "
        f"forward pass as the server runs it (one thread); served img/s with {r['concurrency']} callers, one PNG each.",
        "",
        "| model | accuracy mean / min | params | MACs / image | CPU ms/img b1 | CPU ms/img b32 "
        "| served img/s | p99 ms | on the Pareto front |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    front = pareto_front(rows)
    for row in rows:
        s = row["served"]
        L.append(
            f"| {row['name']} | {row['accuracy_mean']:.3f} / {row['accuracy_min']:.3f} | {row['params']:,} "
            f"| {row['macs'] / 1e6:.1f}M | {row['cpu_ms_per_image_b1']:.3f} | {row['cpu_ms_per_image_b32']:.3f} "
            f"| {s['images_per_s']:.0f} | {s['p99']:.1f} | {'yes' if row['name'] in front else ''} |"
        )
    if "cnn" in by and "vgg" in by:
        cnn, vgg = by["cnn"], by["vgg"]
        L += [
            "",
            f"The default CNN against the first one (vgg), same run: "
            f"**{vgg['cpu_ms_per_image_b32'] / cnn['cpu_ms_per_image_b32']:.1f}x** cheaper at batch 32 and "
            f"**{vgg['cpu_ms_per_image_b1'] / cnn['cpu_ms_per_image_b1']:.1f}x** at batch 1 (targets 8x and 4x)",
        ]
        if "mlp" in by:
            ratio = cnn["served"]["images_per_s"] / by["mlp"]["served"]["images_per_s"]
            L[-1] += f"; served, **{ratio:.2f}x** the MLP's img/s (target 0.9x)."
    if INT8 in by and "cnn" in by:
        q, f = by[INT8], by["cnn"]
        L += [
            "",
            f"int8 (x86, post-training static): {f['cpu_ms_per_image_b32'] / q['cpu_ms_per_image_b32']:.1f}x cheaper "
            f"forward at batch 32, {f['cpu_ms_per_image_b1'] / q['cpu_ms_per_image_b1']:.1f}x at batch 1, "
            f"{q['served']['images_per_s'] / f['served']['images_per_s']:.2f}x the served img/s, "
            f"label agreement with the float model {q['int8_label_agreement']:.3f}. Not shipped: see docs/training.md.",
        ]
    return L


def plot(r: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    front = pareto_front(r["rows"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for row in r["rows"]:
        x, y = row["served"]["images_per_s"], row["accuracy_mean"]
        ax.scatter([x], [y], s=40 + row["macs"] / 2e6, color="C0" if row["name"] in front else "C7", zorder=3)
        ax.annotate(
            f"{row['name']}\n{row['cpu_ms_per_image_b32']:.2f} ms/img",
            (x, y),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
        if len(row["accuracies"]) > 1:
            ax.vlines(x, row["accuracy_min"], max(row["accuracies"]), color="C7", lw=1)
    xs = [row["served"]["images_per_s"] for row in r["rows"]]
    ys = [max(row["accuracies"]) for row in r["rows"]] + [row["accuracy_min"] for row in r["rows"]]
    span_x, span_y = max(xs) - min(xs) or 1.0, max(ys) - min(ys) or 0.1
    ax.set_xlim(min(xs) - 0.05 * span_x, max(xs) + 0.2 * span_x)  # room for the labels, right and above
    ax.set_ylim(min(ys) - 0.05 * span_y, max(ys) + 0.12 * span_y)
    ax.set_xlabel(f"served img/s, {r['concurrency']} callers (one server, default flags)")
    ax.set_ylabel("validation accuracy (real bitmojis)")
    ax.set_title("Accuracy against serving speed (marker area ~ multiply-adds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real data set (default: %(default)s)")
    p.add_argument("--seeds", default="0", help="training seeds of mlp and vgg, comma-separated (default: %(default)s)")
    p.add_argument("--cnn-seeds", default="0,1,2", help="training seeds of the cnn (default: %(default)s)")
    p.add_argument("--arches", default=",".join(ARCHES), help="architectures (default: %(default)s)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 point (default: measure it)")
    p.add_argument(
        "--models", type=Path, default=None, help="keep trained files here and reuse them (default: a temp dir)"
    )
    p.add_argument("--concurrency", type=int, default=32, help="callers for served img/s (default: %(default)s)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per server (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per server (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (default: the recipes')")
    p.add_argument("--out", type=Path, default=RESULTS / "pareto.json", help="JSON result (default: %(default)s)")
    args = p.parse_args(argv)
    r = run(
        data=args.data,
        seeds=[int(s) for s in args.seeds.split(",")],
        cnn_seeds=[int(s) for s in args.cnn_seeds.split(",")],
        arches=args.arches.split(","),
        int8=args.int8,
        models=args.models,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        epochs=args.epochs,
    )
    write_json(args.out, r)
    png = plot(r, args.out.with_suffix(".png"))
    print("\n".join(markdown(r)))
    progress(f"wrote {args.out}" + (f" and {png}" if png else ""))
    return r


if __name__ == "__main__":
    main()
