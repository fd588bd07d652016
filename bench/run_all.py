"""Run the whole benchmark suite and write BENCHMARKS.md and bench/results/throughput.png.

    python -m bench.run_all            # the full suite (about 30 minutes on 2 cores)
    python -m bench.run_all --quick    # every benchmark for a second or so (a smoke run)

Steps, in order (each also writes bench/results/<step>.json):
  inprocess   the in-process limit (decode, forward, decode+forward; processes = cores)
  load_mlp    the server on the lecture's MLP at concurrency 1, 8, 32, 64 (separate generator processes)
  load_cnn    the same on the project's CNN
  load_mlp_workers  load_mlp with `--workers N`, N = cores (one server process per core, one port)
  torchserve  TorchServe 0.12 (2 workers, batching 32 / 5 ms) and this server (1 and 2 processes), \
taking turns level by level
              (skipped, and said so, unless torchserve is installed: see bench/torchserve.py)
  grpc_floor  the same load on a no-op Classifier: what gRPC alone costs one process
  probe       GradientProbe vs Classify latency, one image
  coldstart   process start -> SERVING for the MLP, with a breakdown
  train_loop  the project's training loop vs the lecture's (same model, data, batch size, seed)
  torchserve_cnn  the torchserve step on the default CNN
  models      two models on one server: each alone, then both at once (bench/models.py)
  tracing     served img/s with tracing off, at 100% and at 1% (bench/tracing.py)
  pareto      accuracy against cost per architecture and int8: trains mlp, cnn, vgg on the real data
              (bench/pareto.py; about 10 of the suite's minutes)

Models are exported untrained (seeded) into a temporary directory: weights do
not change speed. Images are read in place from the real bitmoji set.
Ratios are measured side by side in the same run; absolute numbers belong to
the machine in the header (and its load average at the time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_DATA, RESULTS, ROOT, export_model, loadavg, machine, progress, write_json
from bitmoji.server.config import cpu_count

STEPS = (
    "inprocess",
    "load_mlp",
    "load_mlp_workers",
    "torchserve",
    "load_cnn",
    "grpc_floor",
    "probe",
    "coldstart",
    "train_loop",
    "torchserve_cnn",
    "models",
    "tracing",
    "pareto",
)
LOAD_STEPS = {"load_mlp": "MLP", "load_mlp_workers": "MLP, --workers {cores}", "load_cnn": "CNN"}


def _settings(quick: bool) -> dict:
    if quick:
        return dict(
            inproc_duration=0.5,
            inproc_warmup=0.2,
            load_duration=1.0,
            load_warmup=0.3,
            cnn_levels=(1, 32),
            probe_calls=20,
            coldstart_runs=1,
            breakdown=False,
            epochs=1,
            train_per_class=32,
            rounds=1,
        )
    return dict(
        inproc_duration=5.0,
        inproc_warmup=1.0,
        load_duration=8.0,
        load_warmup=2.0,
        cnn_levels=(1, 8, 32, 64),
        probe_calls=300,
        coldstart_runs=3,
        breakdown=True,
        epochs=3,
        train_per_class=None,
        rounds=2,
    )


def subset(data: Path, per_class: int, dest: Path) -> Path:
    """A small ImageFolder tree of symbolic links to the first `per_class` images of each class (nothing copied)."""
    for split in ("train", "valid"):
        for klass in sorted(p for p in (Path(data) / split).iterdir() if p.is_dir()):
            target = dest / split / klass.name
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(klass.glob("*.png"))[:per_class]:
                link = target / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dest


def run_suite(*, quick: bool, data: Path, steps=STEPS, results: Path = RESULTS, server_args: list[str] = ()) -> dict:
    from bench.common import real_images

    s = _settings(quick)
    out: dict = {
        "machine": machine(),
        "quick": quick,
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "data": str(data),
        "server_args": list(server_args),
        "commands": {},
    }
    q = " --quick" if quick else ""
    sa = "".join(f" --server-arg={a}" for a in server_args)
    with tempfile.TemporaryDirectory() as tmp:
        mlp, cnn = str(export_model("mlp", tmp)), str(export_model("cnn", tmp))
        images = real_images(data, 16)
        for step in steps:
            t0 = time.perf_counter()
            progress(f"== {step}")
            try:
                _run_step(step, out, s, q, sa, mlp, cnn, images, data, server_args, tmp)
            except Exception as exc:  # one broken step must not cost the others' results
                progress(f"{step} failed: {type(exc).__name__}: {exc}")
                out.setdefault("failed", {})[step] = f"{type(exc).__name__}: {exc}"
                continue
            r = out[step]
            r["seconds"] = time.perf_counter() - t0
            r["command"] = out["commands"][step]
            write_json(results / f"{step}.json", r)
    out["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    out["loadavg_end"] = loadavg()
    return out


def _run_step(step, out, s, q, sa, mlp, cnn, images, data, server_args, tmp) -> None:
    """Run one step; its result goes to out[step], its command line to out["commands"][step]."""
    from bench import coldstart, grpc_floor, inprocess, load, models, pareto, probe, torchserve, tracing, train_loop

    if step == "inprocess":
        r = inprocess.run(mlp, images, duration=s["inproc_duration"], warmup=s["inproc_warmup"])
        out["commands"][step] = (
            f"python -m bench.inprocess --model mlp --duration {s['inproc_duration']:g} --warmup {s['inproc_warmup']:g}"
        )
    elif step in LOAD_STEPS:
        arch = step.split("_")[1]
        levels = load.DEFAULT_LEVELS if arch == "mlp" else s["cnn_levels"]
        args = [*server_args, f"--workers={cpu_count()}"] if step.endswith("_workers") else list(server_args)
        r = load.run(
            levels,
            model=mlp if arch == "mlp" else cnn,
            duration=s["load_duration"],
            warmup=s["load_warmup"],
            data=data,
            server_args=args,
        )
        out["commands"][step] = (
            f"python -m bench.load --model {arch} --concurrency {','.join(map(str, levels))} "
            f"--duration {s['load_duration']:g} --warmup {s['load_warmup']:g}"
            + "".join(f" --server-arg={a}" for a in args)
        )
    elif step in ("torchserve", "torchserve_cnn"):
        levels = s["cnn_levels"]  # the same levels: all four, or two in a quick run
        arch = "cnn" if step.endswith("_cnn") else "mlp"
        r = torchserve.run(
            levels,
            model=cnn if arch == "cnn" else mlp,
            duration=s["load_duration"],
            warmup=s["load_warmup"],
            data=data,
            server_args=server_args,
        )
        out["commands"][step] = (
            f"python -m bench.torchserve --model {arch} --concurrency {','.join(map(str, levels))} "
            f"--duration {s['load_duration']:g} --warmup {s['load_warmup']:g}{sa}"
        )
    elif step == "models":
        r = models.run(rounds=s["rounds"], duration=s["load_duration"], warmup=s["load_warmup"], data=data)
        out["commands"][step] = (
            f"python -m bench.models --rounds {s['rounds']} --duration {s['load_duration']:g} "
            f"--warmup {s['load_warmup']:g}"
        )
    elif step == "tracing":
        r = tracing.run(rounds=s["rounds"], duration=s["load_duration"], warmup=s["load_warmup"], data=data)
        out["commands"][step] = (
            f"python -m bench.tracing --rounds {s['rounds']} --duration {s['load_duration']:g} "
            f"--warmup {s['load_warmup']:g}"
        )
    elif step == "pareto":
        if q:  # a quick run
            r = pareto.run(
                data=subset(data, s["train_per_class"], Path(tmp) / "subset"),
                arches=("mlp", "cnn"),
                cnn_seeds=(0,),
                epochs=1,
                duration=s["load_duration"],
                warmup=s["load_warmup"],
                target_s=0.2,
            )
            out["commands"][step] = "python -m bench.pareto --arches mlp,cnn  # quick: 1 epoch on a subset"
        else:
            r = pareto.run(data=data, duration=s["load_duration"], warmup=s["load_warmup"])
            out["commands"][step] = (
                f"python -m bench.pareto --duration {s['load_duration']:g} --warmup {s['load_warmup']:g}"
            )
    elif step == "grpc_floor":
        levels = (1, 32, 64)
        r = grpc_floor.run(levels, duration=s["load_duration"], warmup=s["load_warmup"], data=data)
        out["commands"][step] = (
            f"python -m bench.grpc_floor --concurrency {','.join(map(str, levels))} "
            f"--duration {s['load_duration']:g} --warmup {s['load_warmup']:g}"
        )
    elif step == "probe":
        r = probe.run(mlp, s["probe_calls"], data, server_args)
        out["commands"][step] = f"python -m bench.probe --model mlp --calls {s['probe_calls']}{sa}"
    elif step == "coldstart":
        r = coldstart.run(mlp, s["coldstart_runs"], with_breakdown=s["breakdown"])
        out["commands"][step] = f"python -m bench.coldstart --model mlp --runs {s['coldstart_runs']}" + (
            "" if s["breakdown"] else " --no-breakdown"
        )
        workers = f"--workers={cpu_count()}"
        r["workers"] = coldstart.run(mlp, s["coldstart_runs"], with_breakdown=False, server_args=[workers])
        # also in the step's own file: a report that reuses it (--reuse) names it too
        out["commands"][step + "_workers"] = r["workers"]["command"] = (
            f"python -m bench.coldstart --model mlp --runs {s['coldstart_runs']} --no-breakdown --server-arg={workers}"
        )
    elif step == "train_loop":
        if not (Path(data) / "train").is_dir():
            raise FileNotFoundError(f"train_loop needs the real data set ({data}/train)")
        train_data = subset(data, s["train_per_class"], Path(tmp) / "subset") if s["train_per_class"] else data
        r = train_loop.main(["--data", str(train_data), "--epochs", str(s["epochs"])])
        r["loadavg"] = loadavg()
        r["data"] = str(data) + (
            f" (first {s['train_per_class']} images per class and split)" if s["train_per_class"] else ""
        )
        out["commands"][step] = f"python -m bench.train_loop --data {data} --epochs {s['epochs']}" + (
            f"  # on a {s['train_per_class']}-per-class subset" if s["train_per_class"] else ""
        )
    else:
        raise ValueError(f"unknown step {step!r}; choose from {STEPS}")
    out[step] = r


# -- the report ------------------------------------------------------------------------


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def _verdict(ok) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def targets(r: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, verdict) rows for issue 4's targets."""
    rows = []
    ceiling = (r.get("inprocess") or {}).get("ceiling_images_per_s")
    by_c = {row["concurrency"]: row for row in (r.get("load_mlp") or {}).get("rows", [])}
    workers = {row["concurrency"]: row for row in (r.get("load_mlp_workers") or {}).get("rows", [])}
    for c in (32, 64):
        for label, table in (("", by_c), (f", --workers {r['machine']['cores']}", workers)):
            row = table.get(c)
            if row:
                t = row["images_per_s"]
                rows.append(
                    (f"MLP throughput, concurrency {c}{label}", f"{t:.0f} img/s", ">= 3000 img/s", _verdict(t >= 3000))
                )
                if ceiling:
                    rows.append(
                        (
                            f"... vs the in-process ceiling ({ceiling:.0f} img/s, same run)",
                            f"{t / ceiling:.2f}x",
                            ">= 0.8x",
                            _verdict(t / ceiling >= 0.8),
                        )
                    )
    ts = r.get("torchserve") or {}
    for row in ts.get("rows", []):
        if row["concurrency"] not in (32, 64):
            continue
        for key, ratio, label in (
            ("ours", "throughput_ratio", ""),
            ("ours_workers", "workers_throughput_ratio", f", --workers {ts['torchserve_settings']['workers']}"),
        ):
            if key in row:
                t, o, x = row["torchserve"]["images_per_s"], row[key]["images_per_s"], row[ratio]
                rows.append(
                    (
                        f"... vs TorchServe {ts.get('torchserve_version', '')}, same run, "
                        f"concurrency {row['concurrency']}{label}",
                        f"{x:.2f}x ({o:.0f} vs {t:.0f} img/s)",
                        "> 1x (faster); >= 1.5x (the 3000 img/s target's premise)",
                        f"{_verdict(x > 1)}; {_verdict(x >= 1.5)}",
                    )
                )
    ceiling_cpu = (r.get("inprocess") or {}).get("ceiling_cpu_ms_per_image")
    for c in (32, 64):
        row = by_c.get(c)
        if row and ceiling_cpu and row.get("server_cpu_ms_per_image"):
            # the load-independent view: CPU per image in the server vs in the in-process loop
            # (and the generator's share)
            per_image = row["server_cpu_ms_per_image"]
            rows.append(
                (
                    f"... CPU per image, concurrency {c}: in-process / server (1 = as cheap as the ceiling)",
                    f"{ceiling_cpu / per_image:.2f}x ({ceiling_cpu:.3f} / {per_image:.3f} ms)",
                    ">= 0.8x",
                    _verdict(ceiling_cpu / per_image >= 0.8),
                )
            )
    if 1 in by_c:
        p50 = by_c[1]["p50"]
        rows.append(("p50 latency, concurrency 1", f"{p50:.2f} ms", "<= 2 ms", _verdict(p50 <= 2)))
        wait = by_c[1].get("queue_wait_ms")
        if wait is not None:
            rows.append(
                (
                    "lonely caller: mean queue wait in the server, concurrency 1",
                    f"{wait:.3f} ms",
                    "< 0.5 ms (no batching delay)",
                    _verdict(wait < 0.5),
                )
            )
    for label, table in (("", by_c), (f", --workers {r['machine']['cores']}", workers)):
        if 32 in table:
            p99 = table[32]["p99"]
            rows.append((f"p99 latency, concurrency 32{label}", f"{p99:.2f} ms", "<= 25 ms", _verdict(p99 <= 25)))
    if r.get("probe"):
        ratio = r["probe"]["p50_ratio"]
        rows.append(("GradientProbe p50 / Classify p50, one image", f"{ratio:.2f}x", "<= 3x", _verdict(ratio <= 3)))
    if r.get("train_loop"):
        sp = r["train_loop"]["speedup"]
        rows.append(
            (
                f"training loop speed-up vs the lecture's ({r['train_loop'].get('epochs', '?')} epochs, "
                "one-off decode included)",
                f"{sp:.2f}x",
                ">= 2x",
                _verdict(sp >= 2),
            )
        )
        per_epoch = r["train_loop"].get("speedup_per_epoch")
        if per_epoch:
            rows.append(
                (
                    "... per epoch once decoded (what longer runs tend to)",
                    f"{per_epoch:.2f}x",
                    ">= 2x",
                    _verdict(per_epoch >= 2),
                )
            )
    if r.get("coldstart"):
        cs = r["coldstart"]["serving_s_median"]
        rows.append(("cold start to SERVING, MLP", f"{cs:.2f} s", "<= 5 s", _verdict(cs <= 5)))
        workers = r["coldstart"].get("workers")
        if workers:
            cw = workers["serving_s_median"]
            rows.append(
                (
                    f"... with {' '.join(workers['server_args'])} (the first worker SERVING)",
                    f"{cw:.2f} s",
                    "<= 5 s",
                    _verdict(cw <= 5),
                )
            )
    return rows


def cnn_targets(r: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, verdict) rows for issue 13's targets: the cheap CNN and the MLP under load."""
    rows = []
    by = {row["name"]: row for row in (r.get("pareto") or {}).get("rows", [])}
    cnn, vgg, mlp = by.get("cnn"), by.get("vgg"), by.get("mlp")
    if cnn:
        n = len(cnn["accuracies"])
        rows.append(
            (
                f"default CNN validation accuracy, mean (min) of {n} seed(s)",
                f"{cnn['accuracy_mean']:.3f} ({cnn['accuracy_min']:.3f})",
                ">= 0.97 (none below 0.96)",
                _verdict(cnn["accuracy_mean"] >= 0.97 and cnn["accuracy_min"] >= 0.96),
            )
        )
        seconds = [t for t in cnn.get("train_seconds") or [] if t is not None]
        if seconds:
            rows.append(
                (
                    "default CNN training time, 2 cores (slowest seed; a busy box stretches it)",
                    f"{max(seconds):.0f} s",
                    "<= 180 s",
                    _verdict(max(seconds) <= 180),
                )
            )
    if cnn and vgg:
        for batch, goal in (("b32", 8), ("b1", 4)):
            x = vgg[f"cpu_ms_per_image_{batch}"] / cnn[f"cpu_ms_per_image_{batch}"]
            rows.append(
                (
                    f"CNN forward pass, CPU ms per image at batch {batch[1:]}: the first CNN / the default",
                    f"{x:.1f}x ({vgg[f'cpu_ms_per_image_{batch}']:.3f} / {cnn[f'cpu_ms_per_image_{batch}']:.3f} ms)",
                    f">= {goal}x",
                    _verdict(x >= goal),
                )
            )
    if cnn and mlp:
        x = cnn["served"]["images_per_s"] / mlp["served"]["images_per_s"]
        rows.append(
            (
                f"CNN served img/s / the MLP's, {r['pareto']['concurrency']} callers",
                f"{x:.2f}x ({cnn['served']['images_per_s']:.0f} / {mlp['served']['images_per_s']:.0f})",
                ">= 0.9x",
                _verdict(x >= 0.9),
            )
        )
    for step, name, goals in (
        ("torchserve_cnn", "CNN", {1: 1.0, 8: 1.0, 32: 1.0, 64: 1.0}),
        ("torchserve", "MLP", {1: 2.0, 64: 1.0}),
    ):
        for row in (r.get(step) or {}).get("rows", []):
            goal = goals.get(row["concurrency"])
            if goal is None or "throughput_ratio" not in row:
                continue
            x = row["throughput_ratio"]
            rows.append(
                (
                    f"{name}, one server (default flags) / TorchServe, {row['concurrency']} callers",
                    f"{x:.2f}x ({row['ours']['images_per_s']:.0f} vs {row['torchserve']['images_per_s']:.0f})",
                    f"{'>' if goal == 1.0 and name == 'CNN' else '>='} {goal:g}x",
                    _verdict(x > goal if name == "CNN" else x >= goal),
                )
            )
    return rows


def markdown(r: dict, plot: str | None) -> str:
    m = r["machine"]
    L = [
        "# Benchmarks",
        "",
        "Written by `python -m bench.run_all"
        + (" --quick" if r["quick"] else "")
        + "` (issue 4). "
        + ("**Quick run: tiny durations, the figures are smoke values, not measurements.** " if r["quick"] else "")
        + "Absolute figures belong to the machine below, at the load average shown beside each result: "
        "this is a small shared box, so compare ratios measured in the same run, not absolute numbers across runs.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU | {m['cpu']} |",
        f"| cores | {m['cores']} |",
        f"| load average (1, 5, 15 min) at start / end | {m['loadavg']} / {r.get('loadavg_end')} |",
        f"| Python / torch / grpcio | {m['python']} / {m['torch']} / {m['grpcio']} |",
        f"| platform | {m['platform']} |",
        f"| run | {r['started']} to {r.get('finished')}"
        + (f" (the {len(r['reused'])} steps marked as reused ran earlier, on this box)" if r.get("reused") else "")
        + " |",
        f"| images | one 128x128 PNG of the real bitmoji set per call ({r['data']}) |",
        "",
        "## Issue 4's targets",
        "",
        "| target | measured | goal | |",
        "| --- | --- | --- | --- |",
    ]
    L += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(r)]
    cnn_rows = cnn_targets(r)
    if cnn_rows:
        L += ["", "## Issue 13's targets", "", "| target | measured | goal | |", "| --- | --- | --- | --- |"]
        L += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in cnn_rows]
    if r.get("pareto"):
        from bench import pareto

        L += ["", "## Accuracy against cost: each architecture, and int8", "", *pareto.markdown(r["pareto"])]
        if plot:  # written beside the throughput plot
            L += ["", f"![accuracy against served img/s]({os.path.join(os.path.dirname(plot), 'pareto.png')})"]
    if r.get("reused"):
        L += ["", f"Reused from an earlier run (see the commands): {', '.join(r['reused'])}."]
    if r.get("failed"):
        L += ["", "Failed steps: " + "; ".join(f"{k}: {v}" for k, v in r["failed"].items())]
    ip = r.get("inprocess")
    if ip:
        L += [
            "",
            "## In-process limit (no server)",
            "",
            f"`{r['commands']['inprocess']}`: MLP, batch {ip['batch']}, {ip['duration_s']:g} s per row.",
            "",
            "| measurement | img/s | wall ms per image | CPU ms per image | load average |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, row in ip["rows"].items():
            L.append(
                f"| {name} | {row['images_per_s']:.0f} | {1000 / row['images_per_s']:.3f} "
                f"| {_fmt(row.get('cpu_ms_per_image'), '.3f')} "
                f"| {row.get('loadavg')} |"
            )
        L.append("")
        L.append(
            f"The ceiling the server is held to (0.8x): **{ip['ceiling_images_per_s']:.0f} img/s** "
            f"(decode + forward in {ip['cores']} one-thread processes) at this load; from its CPU time per image, "
            f"{ip['cores']} idle cores "
            f"would do about {_fmt(ip.get('ceiling_idle_estimate_images_per_s'), '.0f')} img/s."
        )
    for step, name in LOAD_STEPS.items():
        title = "Server under load: " + name.format(cores=m["cores"])
        lr = r.get(step)
        if not lr:
            continue
        L += [
            "",
            f"## {title}",
            "",
            f"`{r['commands'][step]}` (the generator runs in its own process(es); "
            f"server ready after {_fmt(lr.get('server_ready_s'))} s).",
            "",
            "| concurrency | img/s | p50 ms | p90 ms | p99 ms | errors | mean batch "
            "| decode ms | queue wait ms | forward ms/batch "
            "| parse + serialise ms | server CPU (cores) | server CPU ms/img | generator CPU (cores) | load average |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in lr["rows"]:
            L.append(
                f"| {row['concurrency']} | {row['images_per_s']:.0f} | {_fmt(row['p50'])} "
                f"| {_fmt(row['p90'])} | {_fmt(row['p99'])} "
                f"| {row['error_count']} | {_fmt(row.get('mean_batch_size'))} | {_fmt(row.get('decode_ms'), '.3f')} "
                f"| {_fmt(row.get('queue_wait_ms'), '.3f')} | {_fmt(row.get('forward_ms_per_batch'), '.3f')} "
                f"| {_codec_ms(row)} | {_fmt(row.get('server_cpu_cores'))} "
                f"| {_fmt(row.get('server_cpu_ms_per_image'), '.3f')} "
                f"| {_fmt(row['generator_cpu_cores'])} | {row['loadavg']} |"
            )
    for step, model in (("torchserve", "MLP"), ("torchserve_cnn", "CNN")):
        L += _torchserve_section(r, step, model)
    gf = r.get("grpc_floor")
    if gf:
        L += [
            "",
            "## The gRPC floor: a Classifier that does nothing",
            "",
            f"`{r['commands']['grpc_floor']}`: the same generator and "
            "requests against a grpc.aio servicer that answers without decoding "
            "or running a model: the most one server "
            "process can do, and the CPU per call that no model or decoder change removes.",
            "",
            "| concurrency | calls/s | p50 ms | p99 ms | server CPU (cores) | server CPU ms/call | load average |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in gf["rows"]:
            L.append(
                f"| {row['concurrency']} | {row['images_per_s']:.0f} | {_fmt(row['p50'])} | {_fmt(row['p99'])} "
                f"| {_fmt(row.get('server_cpu_cores'))} "
                f"| {_fmt(row.get('server_cpu_ms_per_image'), '.3f')} | {row['loadavg']} |"
            )
    pr = r.get("probe")
    if pr:
        L += [
            "",
            "## GradientProbe vs Classify (one image, concurrency 1, interleaved)",
            "",
            f"`{r['commands']['probe']}`",
            "",
            "| method | p50 ms | p90 ms | p99 ms |",
            "| --- | --- | --- | --- |",
            f"| Classify | {_fmt(pr['classify_ms']['p50'])} "
            f"| {_fmt(pr['classify_ms']['p90'])} | {_fmt(pr['classify_ms']['p99'])} |",
            f"| GradientProbe | {_fmt(pr['probe_ms']['p50'])} "
            f"| {_fmt(pr['probe_ms']['p90'])} | {_fmt(pr['probe_ms']['p99'])} |",
            "",
            f"p50 ratio {pr['p50_ratio']:.2f} over {pr['calls']} calls each; load average {pr['loadavg']}.",
        ]
    cs = r.get("coldstart")
    if cs:
        L += [
            "",
            "## Cold start (MLP)",
            "",
            f"`{r['commands']['coldstart']}`: process start to health SERVING, "
            f"median **{cs['serving_s_median']:.2f} s** of {[round(t['serving_s'], 2) for t in cs['runs']]}; "
            f"load average {cs['loadavg']}.",
        ]
        w = cs.get("workers")
        if w:
            L += [
                "",
                f"`{r['commands'].get('coldstart_workers') or w.get('command', '?')}`: "
                "process start to the first worker's health SERVING, "
                f"median **{w['serving_s_median']:.2f} s** of {[round(t['serving_s'], 2) for t in w['runs']]} "
                "(the supervisor imports no torch: the workers start at once); "
                f"load average {w['loadavg']}.",
            ]
        b = cs.get("breakdown")
        if b:
            L += [
                "",
                "| part (one fresh interpreter doing the start-up steps in turn; "
                "rest = SERVING minus the parts) | seconds |",
                "| --- | --- |",
            ]
            for k, v in b.items():
                if isinstance(v, float):
                    L.append(f"| {k.removesuffix('_s').replace('_', ' ')} | {v:.2f} |")
            L += [
                "",
                "Slowest modules (self time, `python -X importtime -c 'import bitmoji.server.server'`): "
                + ", ".join(f"{k} {v:.0f} ms" for k, v in list(b["importtime_self_top_ms"].items())[:8])
                + ".",
            ]
    tl = r.get("train_loop")
    if tl:
        L += [
            "",
            "## Training loop: the project's vs the lecture's (MLP, same data, batch size and seed)",
            "",
            f"`{r['commands']['train_loop']}`",
            "",
            "| loop | seconds | images/s | valid accuracy |",
            "| --- | --- | --- | --- |",
        ]
        for row in tl["rows"]:
            L.append(
                f"| {row['loop']} | {row['seconds']:.1f} | {row['images_per_s']:.0f} | {row['valid_accuracy']:.3f} |"
            )
        L += [
            "",
            f"Speed-up {tl['speedup']:.2f}x with the one-off decode, "
            f"{_fmt(tl.get('speedup_per_epoch'))}x per epoch once decoded; "
            f"load average {tl.get('loadavg')}.",
        ]
    mo = r.get("models")
    if mo:
        L += [
            "",
            "## Two models on one server",
            "",
            f"`{r['commands']['models']}`: a repository of the MLP and the CNN; each alone with "
            f"{mo['concurrency']} callers, then both at once with half each, in turn.",
            "",
            "| model | alone img/s | together img/s | together / alone (median) | memory per version MiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for m in mo["alone_images_per_s"]:
            L.append(
                f"| {m} | {mo['alone_images_per_s'][m]} | {mo['together_images_per_s'][m]} "
                f"| {mo['median_ratio'][m]:.2f} | {_fmt(mo['memory_mib_per_version'].get(f'{m} v1'), '.0f')} |"
            )
        L += ["", f"Sum of the median ratios {mo['sum_of_median_ratios']:.2f} (1: the cores stay as busy as with one "
              f"model); server RSS {mo['server_rss_mib']:.0f} MiB."]  # fmt: skip
    tr = r.get("tracing")
    if tr:
        L += [
            "",
            "## What tracing costs",
            "",
            f"`{r['commands']['tracing']}`: the MLP, {tr['concurrency']} callers, a real OTLP exporter sending to a "
            "sink on loopback; the configurations take turns.",
            "",
            "| tracing | img/s per round | ratio to off (median) | spans exported | errors |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, t in tr["summary"].items():
            L.append(
                f"| {name} | {t['images_per_s']} | {t['median_ratio']:.2f} | {t['spans_exported']} | {t['errors']} |"
            )
    if plot:
        L += ["", "## Throughput and p99 vs concurrency", "", f"![throughput and p99 vs concurrency]({plot})"]
    L += ["", "## Commands", "", "```", *(f"{c}" for c in r["commands"].values()), "```", ""]
    return "\n".join(L)


def _torchserve_section(r: dict, step: str, model: str) -> list[str]:
    L: list[str] = []
    ts = r.get(step)
    if ts and ts.get("skipped"):
        L += ["", f"## TorchServe side by side: {model}", "", f"Skipped: {ts['skipped']}."]
    elif ts:
        st = ts["torchserve_settings"]
        L += [
            "",
            f"## TorchServe {ts['torchserve_version']} side by side: {model}",
            "",
            f"`{r['commands'][step]}`: TorchServe over gRPC (`Predictions`), {st['workers']} workers, batching "
            f"{st['batch_size']} / {st['max_batch_delay_ms']} ms, the same TorchScript file and the same decode "
            "(its handler calls `bitmoji.core.preprocess.load_image`; "
            f"answers agreed to {ts['max_probability_difference']:.1g}); "
            'this server runs as one process ("ours") '
            f"and with `--workers {st['workers']}` (as many processes as TorchServe's "
            "workers); the servers take turns at each level, under the same generator.",
            "",
            "| concurrency | TorchServe img/s | p50 ms | p99 ms | CPU (cores) "
            "| ours img/s | p50 ms | p99 ms | CPU (cores) | ours / TorchServe "
            f"| --workers {st['workers']} img/s | p50 ms | p99 ms | CPU (cores) "
            f"| --workers {st['workers']} / TorchServe |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in ts["rows"]:
            cells = [f"| {row['concurrency']} "]
            for key, ratio in (
                ("torchserve", None),
                ("ours", "throughput_ratio"),
                ("ours_workers", "workers_throughput_ratio"),
            ):
                x = row.get(key)
                if x is None:
                    cells.append("| | | | | ")
                    continue
                cells.append(
                    f"| {x['images_per_s']:.0f} | {_fmt(x['p50'])} | {_fmt(x['p99'])} "
                    f"| {_fmt(x.get('server_cpu_cores'))} "
                )
                if ratio:
                    cells.append(f"| {row[ratio]:.2f}x ")
            L.append("".join(cells) + "|")
        L += ["", f"Load average at the end: {ts.get('loadavg')}."]
    return L


def _codec_ms(row: dict) -> str:
    """Mean protobuf parse of a request plus serialisation of a response, per call
    ("-" in results from before the metric).
    """
    parse, serialize = row.get("parse_ms"), row.get("serialize_ms")
    return "-" if parse is None or serialize is None else f"{parse + serialize:.3f}"


def plot(r: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(name.format(cores=r["machine"]["cores"]), r[k]["rows"]) for k, name in LOAD_STEPS.items() if r.get(k)]
    if (r.get("torchserve") or {}).get("rows"):
        rows = r["torchserve"]["rows"]
        series += [
            ("TorchServe (same run)", [{**row["torchserve"], "concurrency": row["concurrency"]} for row in rows]),
            ("MLP beside TorchServe (same run)", [{**row["ours"], "concurrency": row["concurrency"]} for row in rows]),
        ]
        if all("ours_workers" in row for row in rows):
            series.append(
                (
                    f"MLP --workers {r['torchserve']['torchserve_settings']['workers']} beside TorchServe (same run)",
                    [{**row["ours_workers"], "concurrency": row["concurrency"]} for row in rows],
                )
            )
    if not series:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in series:
        cs = [row["concurrency"] for row in rows]
        ax1.plot(cs, [row["images_per_s"] for row in rows], "o-", label=name)
        ax2.plot(cs, [row["p99"] or float("nan") for row in rows], "o-", label=name)
    ceiling = (r.get("inprocess") or {}).get("ceiling_images_per_s")
    if ceiling:
        ax1.axhline(0.8 * ceiling, ls="--", c="gray", label=f"0.8x in-process ceiling ({0.8 * ceiling:.0f})")
    ax1.axhline(3000, ls=":", c="red", label="target 3000 img/s")
    ax2.axhline(25, ls=":", c="red", label="target p99 25 ms (conc. 32)")
    for ax, label in ((ax1, "throughput (img/s)"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers (one image per call)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    m = r["machine"]
    fig.suptitle(
        f"bitmoji-serve on {m['cpu']}, {m['cores']} cores, load avg {m['loadavg']}"
        + (" (quick run)" if r["quick"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny durations: a smoke run of every benchmark")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the real bitmoji set")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--results", default=str(RESULTS), help="directory for the JSON results and the plot")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="the report to write")
    p.add_argument("--server-arg", action="append", default=[], help="a flag for every server started (repeat)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="for the steps not run now, put the results already in --results into the report (they say so)",
    )
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    results = Path(args.results)
    r = run_suite(quick=args.quick, data=Path(args.data), steps=steps, results=results, server_args=args.server_arg)
    if args.reuse:
        for step in STEPS:
            path = results / f"{step}.json"
            if step not in r and path.exists():
                r[step] = json.loads(path.read_text())
                r["commands"][step] = r[step].get("command", "?") + "  # reused from an earlier run"
                r.setdefault("reused", []).append(step)
    png = plot(r, results / "throughput.png")
    if r.get("pareto"):
        from bench import pareto

        pareto.plot(r["pareto"], results / "pareto.png")
    out = Path(args.out)
    rel = os.path.relpath(png, out.parent) if png else None
    out.write_text(markdown(r, rel))
    write_json(results / "suite.json", r)
    progress(f"wrote {out} and {png}")
    for a, b, c, d in targets(r) + cnn_targets(r):
        print(f"{a}: {b} (goal {c}) {d.strip('*')}")
    return r


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
