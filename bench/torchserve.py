"""TorchServe and this server side by side: same machine, model, images, load generator and minute.

    pip install torchserve==0.12.0 torch-model-archiver==0.12.0   # an optional extra; needs Java 17
    python -m bench.torchserve --concurrency 1,8,32,64 --duration 5

TorchServe is set up as the issue measured it: gRPC `Predictions`, 2 workers,
batching 32 / 5 ms, the same exported MLP loaded with `torch.jit.load`, and a
handler that decodes with this project's own `bitmoji.core.preprocess.load_image`,
so both servers do the same work per image (their answers are compared before
measuring). This server runs twice beside it: as one process (the default) and
with `--workers 2`, as many processes as TorchServe has workers. The servers
take turns at each level (who goes first rotates), so the box's drift hits
all alike. Without torchserve installed it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    CLASSIFY,
    ROOT,
    classify_request,
    export_model,
    free_port,
    loadavg,
    machine,
    progress,
    real_images,
    start_server,
    write_json,
)
from bench.load import DEFAULT_LEVELS, auto_procs, run_level, scrape, stage_means
from bitmoji.server.config import cpu_count

PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
MODEL_NAME = "bitmoji"
SETTINGS = {"workers": 2, "batch_size": 32, "max_batch_delay_ms": 5}  # the TorchServe configuration

# The TorchServe handler: a module-level `handle` (TorchServe's simplest custom handler form).
HANDLER = """\
import os
import torch
from bitmoji.core.preprocess import load_image, to_model_input

_model = None


def handle(data, context):
    global _model
    if _model is None:
        torch.set_num_threads(1)
        props = context.system_properties
        _model = torch.jit.load(os.path.join(props["model_dir"], context.manifest["model"]["serializedFile"]))
        _model.eval()
    if data is None:
        return None
    x = to_model_input(torch.stack([load_image(bytes(row.get("data") or row.get("body"))) for row in data]))
    with torch.inference_mode():
        p = torch.sigmoid(_model(x).reshape(-1))
    return [f"{v:.6f}" for v in p.tolist()]
"""


def tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def missing() -> str | None:
    """Why TorchServe cannot run here (None when it can)."""
    for name in ("torchserve", "torch-model-archiver", "java"):
        if tool(name) is None:
            return (
                f"{name} not found (pip install torchserve==0.12.0 torch-model-archiver==0.12.0; "
                "TorchServe needs Java 17)"
            )
    return None


# -- TorchServe's gRPC messages, hand-encoded (its protos are not a dependency) -------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def predictions_request(image: bytes, model_name: str = MODEL_NAME) -> bytes:
    """PredictionsRequest{model_name = 1; map<string, bytes> input = 3} with input {"data": image}."""
    return _field(1, model_name.encode()) + _field(3, _field(1, b"data") + _field(2, image))


def prediction(response: bytes) -> bytes:
    """PredictionResponse.prediction (field 1, bytes)."""
    i = 0
    while i < len(response):
        key, i = _read_varint(response, i)
        if key & 7 != 2:
            raise ValueError(f"unexpected wire type {key & 7} in a PredictionResponse")
        size, i = _read_varint(response, i)
        if key >> 3 == 1:
            return response[i : i + size]
        i += size
    raise ValueError("no prediction in the PredictionResponse")


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


# -- the TorchServe process -------------------------------------------------------------------


class TorchServe:
    """A foreground `torchserve` in a directory of its own (its pid file too: TMPDIR), on free loopback ports."""

    def __init__(self, model: str, workdir: Path, image: bytes, *, timeout: float = 240):
        self.workdir = workdir
        store = workdir / "store"
        store.mkdir(parents=True)
        (workdir / "handler.py").write_text(HANDLER)
        subprocess.run(
            [
                tool("torch-model-archiver"),
                "--model-name",
                MODEL_NAME,
                "--version",
                "1.0",
                "--serialized-file",
                model,
                "--handler",
                str(workdir / "handler.py"),
                "--export-path",
                str(store),
            ],
            check=True,
            capture_output=True,
        )
        self.grpc_port = free_port()
        ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_management")}
        models = (
            f'{{"{MODEL_NAME}": {{"1.0": {{"defaultVersion": true, "marName": "{MODEL_NAME}.mar", '
            f'"minWorkers": {SETTINGS["workers"]:d}, "maxWorkers": {SETTINGS["workers"]:d}, '
            f'"batchSize": {SETTINGS["batch_size"]:d}, "maxBatchDelay": {SETTINGS["max_batch_delay_ms"]:d}, '
            '"responseTimeout": 120}}}'
        )
        (workdir / "config.properties").write_text(
            "\n".join(
                [
                    *(
                        f"{name}_address=http://127.0.0.1:{ports[name]}"
                        for name in ("inference", "management", "metrics")
                    ),
                    "grpc_inference_address=127.0.0.1",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_inference_port={self.grpc_port}",
                    f"grpc_management_port={ports['grpc_management']}",
                    "disable_token_authorization=true",
                    "enable_envvars_config=false",
                    "install_py_dep_per_model=false",
                    f"model_store={store}",
                    f"load_models={MODEL_NAME}.mar",
                    f"models={models}",
                    "",
                ]
            )
        )
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "TMPDIR": str(workdir),
            "LOG_LOCATION": str(workdir / "logs"),
            "METRICS_LOCATION": str(workdir / "logs"),
        }
        self.log = open(workdir / "torchserve.log", "w")
        self.proc = subprocess.Popen(
            [
                tool("torchserve"),
                "--start",
                "--ncs",
                "--foreground",
                "--ts-config",
                str(workdir / "config.properties"),
                "--model-store",
                str(store),
            ],
            cwd=workdir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.target = f"127.0.0.1:{self.grpc_port}"
        try:
            self._wait_ready(predictions_request(image), timeout)
        except BaseException:
            self.stop()  # never leave its Java frontend and workers running
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, request: bytes, timeout: float) -> None:
        import grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            call = channel.unary_unary(PREDICTIONS)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"torchserve exited with {self.proc.returncode}; see {self.workdir / 'torchserve.log'}"
                    )
                try:
                    call(request, timeout=10)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"torchserve not serving after {timeout:g} s; see {self.workdir / 'torchserve.log'}"
                        ) from None
                    time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the launcher, its Java frontend and the Python workers
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


# -- the comparison ------------------------------------------------------------------------------


def agree(ts_target: str, our_target: str, images: list[bytes]) -> float:
    """Largest |probability difference| between the two servers over `images` (they must run the same model)."""
    import grpc

    from bitmoji.v1 import classifier_pb2 as pb

    worst = 0.0
    with grpc.insecure_channel(ts_target) as ts, grpc.insecure_channel(our_target) as ours:
        ts_call = ts.unary_unary(PREDICTIONS)
        our_call = ours.unary_unary(
            "/bitmoji.v1.Classifier/Classify", response_deserializer=pb.ClassifyResponse.FromString
        )
        for image in images:
            theirs = float(prediction(ts_call(predictions_request(image), timeout=30)))
            mine = our_call(classify_request(image), timeout=30).predictions[0].probability
            worst = max(worst, abs(theirs - mine))
    return worst


def run(
    levels=DEFAULT_LEVELS,
    *,
    model: str | None = None,
    duration: float = 5.0,
    warmup: float = 1.0,
    n_images: int = 8,
    data=None,
    server_args: list[str] = (),
) -> dict:
    """TorchServe and this server, as one process and as `--workers` processes, each under the same load in turn.

    TorchServe runs SETTINGS["workers"] model processes behind its frontend; "ours_workers" is this server with as
    many processes (`--workers`), the like-for-like setting; "ours" the default single process.
    {"skipped": why} without TorchServe.
    """
    why = missing()
    if why:
        progress(f"torchserve: skipped: {why}")
        return {"benchmark": "torchserve", "skipped": why}
    images = real_images(data, n_images)
    name = model or "mlp"
    workers_args = [*server_args, f"--workers={SETTINGS['workers']}"]
    with tempfile.TemporaryDirectory() as tmp:
        model = str(export_model(name, tmp)) if name in ("mlp", "cnn") else name
        progress(f"torchserve: starting TorchServe ({SETTINGS}) and this server on {model}")
        ts = TorchServe(model, Path(tmp) / "torchserve", images[0])
        ours = ours_workers = None
        try:
            ours = start_server(model, list(server_args))
            ours_workers = start_server(model, workers_args)
            difference = max(agree(ts.target, ours.target, images), agree(ts.target, ours_workers.target, images))
            if difference > 1e-4:
                raise RuntimeError(
                    f"the servers disagree (probabilities differ by up to {difference:.2g}): not the same work"
                )
            classify = [classify_request(b) for b in images]
            servers = {
                "torchserve": (ts.target, [predictions_request(b) for b in images], [ts.pid], PREDICTIONS, None),
                "ours": (ours.target, classify, [ours.pid], CLASSIFY, ours),
                "ours_workers": (ours_workers.target, classify, [ours_workers.pid], CLASSIFY, ours_workers),
            }
            order = list(servers)
            rows = []
            for i, c in enumerate(levels):
                row = {"concurrency": c}
                for name in order[i % len(order) :] + order[: i % len(order)]:  # who goes first rotates level by level
                    target, requests, pids, method, server = servers[name]
                    progress(f"torchserve: concurrency {c}, {name}: {warmup:g} s warm-up + {duration:g} s...")
                    before = scrape(server)
                    r = run_level(
                        target,
                        requests,
                        c,
                        duration=duration,
                        warmup=warmup,
                        procs=auto_procs(c),
                        server_pids=pids,
                        method=method,
                    )
                    r.update(stage_means(before, scrape(server)) if server else {})
                    row[name] = r
                    progress(
                        f"  {r['images_per_s']:.0f} img/s, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, "
                        f"errors {r['error_count']}, server {r['server_cpu_cores']:.2f} cores"
                    )
                theirs = max(row["torchserve"]["images_per_s"], 1e-9)
                row["throughput_ratio"] = row["ours"]["images_per_s"] / theirs
                row["workers_throughput_ratio"] = row["ours_workers"]["images_per_s"] / theirs
                rows.append(row)
        finally:
            for server in (ours, ours_workers):
                if server is not None:
                    server.stop()
            ts.stop()
    return {
        "benchmark": "torchserve",
        "torchserve_version": _version("torchserve"),
        "torchserve_settings": SETTINGS,
        "server_args": list(server_args),
        "workers_server_args": workers_args,
        "model": name,
        "max_probability_difference": difference,
        "duration_s": duration,
        "warmup_s": warmup,
        "n_images": len(images),
        "rows": rows,
        "loadavg": loadavg(),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m bench.torchserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default=None, help="model file for both servers, or mlp/cnn to export an untrained one (default mlp)"
    )
    p.add_argument(
        "--concurrency", default=",".join(map(str, DEFAULT_LEVELS)), help="comma-separated levels (default 1,8,32,64)"
    )
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds measured per level and server, after the warm-up"
    )
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--data", default=None, help="the real bitmoji set (default ../shared/data/bitmoji)")
    p.add_argument("--server-arg", action="append", default=[], help="a flag for this project's server (repeat)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    result = run(
        levels,
        model=args.model,
        duration=args.duration,
        warmup=args.warmup,
        data=args.data,
        server_args=args.server_arg,
    )
    result["machine"] = machine()
    if "rows" in result:
        n = SETTINGS["workers"]
        print(
            f"{'conc':>5} {'TorchServe img/s':>17} {'p50 ms':>7} {'p99 ms':>7} {'ours img/s':>11} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} "
            f"{f'--workers {n} img/s':>19} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6}"
        )
        for r in result["rows"]:
            t, o, w = r["torchserve"], r["ours"], r["ours_workers"]
            print(
                f"{r['concurrency']:>5} {t['images_per_s']:>17.0f} {t['p50']:>7.2f} {t['p99']:>7.2f} "
                f"{o['images_per_s']:>11.0f} {o['p50']:>7.2f} {o['p99']:>7.2f} {r['throughput_ratio']:>6.2f} "
                f"{w['images_per_s']:>19.0f} {w['p50']:>7.2f} {w['p99']:>7.2f} {r['workers_throughput_ratio']:>6.2f}"
            )
        print(f"loadavg {loadavg()} on {cpu_count()} cores")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
