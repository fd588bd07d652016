"""Smoke runs of every benchmark in bench/ (a second or two of measuring each), so the scripts cannot rot.

They check that each script runs end to end through its command line, writes
its JSON with the fields the report needs, measures something (throughput > 0)
and sees no errors. The figures themselves are not judged: CI machines differ.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import coldstart, faults, grpc_floor, inprocess, load, pareto, probe, run_all, torchserve, train_loop
from bench import tracing as tracing_bench
from bench.common import percentiles, real_images

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_inprocess_smoke(mlp_model_file, tmp_path):
    out = tmp_path / "inprocess.json"
    inprocess.main(
        [
            "--model",
            str(mlp_model_file),
            "--duration",
            "0.3",
            "--warmup",
            "0.05",
            "--processes",
            "1",
            "--json",
            str(out),
        ]
    )
    r = read(out)
    for name in (
        "decode_1thread",
        "decode_1proc",
        "forward_1thread",
        "decode_forward_1proc",
        "decode_forward_1threads",
    ):
        assert r["rows"][name]["images_per_s"] > 0, name
    assert 0 < r["decode_ms_per_image"] < 1000
    assert r["ceiling_images_per_s"] > 0 and r["ceiling_cpu_ms_per_image"] > 0
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch"]


def test_load_smoke(mlp_model_file, tmp_path):
    out = tmp_path / "load.json"
    # concurrency 4 from two generator processes: the split path too; two server workers: their CPU and metrics add up
    load.main(
        [
            "--model",
            str(mlp_model_file),
            "--concurrency",
            "1,4",
            "--procs",
            "2",
            "--duration",
            "0.6",
            "--warmup",
            "0.2",
            "--server-arg=--workers=2",
            "--json",
            str(out),
        ]
    )
    r = read(out)
    assert [row["concurrency"] for row in r["rows"]] == [1, 4]
    assert r["rows"][0]["generator_processes"] == 1 and r["rows"][1]["generator_processes"] == 2
    for row in r["rows"]:
        assert row["error_count"] == 0, row["errors"]
        assert row["calls"] > 0 and row["images_per_s"] > 0
        assert 0 < row["p50"] <= row["p90"] <= row["p99"] <= row["max"]
        assert row["generator_cpu_cores"] > 0 and row["server_cpu_cores"] > 0
        assert row["mean_batch_size"] >= 1 and row["forward_ms_per_batch"] > 0 and row["decode_ms"] > 0
    assert r["rows"][0]["mean_batch_size"] == 1  # one caller: every batch holds its one item
    assert r["server"]["architecture"] == "mlp"


def test_load_counts_errors(mlp_model_file, tmp_path):
    """A benchmark must be able to fail: a request the server refuses shows up as errors, not as throughput."""
    with load_server(mlp_model_file) as server:
        bad = [b"\x0a\x03\x0a\x01\x00"]  # a ClassifyRequest whose one image is a single zero byte
        row = load.run_level(server.target, bad, 2, duration=0.4, warmup=0.1)
    assert row["calls"] == 0 and row["error_count"] > 0
    assert set(row["errors"]) == {"INVALID_ARGUMENT"}


def load_server(model):
    from bench.common import start_server

    return start_server(model, metrics=False)


def test_grpc_floor_smoke(tmp_path):
    out = tmp_path / "floor.json"
    grpc_floor.main(["--concurrency", "1,4", "--duration", "0.5", "--warmup", "0.1", "--json", str(out)])
    rows = read(out)["rows"]
    assert [row["concurrency"] for row in rows] == [1, 4]
    for row in rows:
        assert row["error_count"] == 0 and row["images_per_s"] > 0 and row["server_cpu_cores"] > 0


def test_probe_smoke(mlp_model_file, tmp_path):
    out = tmp_path / "probe.json"
    probe.main(["--model", str(mlp_model_file), "--calls", "5", "--json", str(out)])
    r = read(out)
    assert r["calls"] == 5
    assert r["classify_ms"]["p50"] > 0 and r["probe_ms"]["p50"] > 0 and r["p50_ratio"] > 0


def test_coldstart_smoke(mlp_model_file, tmp_path):
    out = tmp_path / "coldstart.json"
    coldstart.main(["--model", str(mlp_model_file), "--runs", "1", "--json", str(out)])
    r = read(out)
    assert 0 < r["runs"][0]["health_answers_s"] <= r["runs"][0]["serving_s"] == r["serving_s_median"]
    b = r["breakdown"]
    for part in (
        "interpreter_s",
        "import_torch_s",
        "import_grpc_s",
        "import_server_rest_s",
        "load_model_s",
        "warmup_s",
    ):
        assert b[part] >= 0, part
    assert b["import_torch_s"] > 0 and "torch" in b["importtime_cumulative_ms"]


def tiny_image_folder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for k, klass in enumerate(("not_tom", "tom")):
            (root / split / klass).mkdir(parents=True)
            for i in range(per_class):
                array = np.clip(rng.normal(80 + 100 * k, 30, (128, 128, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(array).save(root / split / klass / f"{i}.png")
    return root


def test_train_loop_smoke(tmp_path):
    data = tiny_image_folder(tmp_path / "data")
    out = tmp_path / "train.json"
    r = train_loop.main(["--data", str(data), "--epochs", "1", "--batch-size", "4", "--json", str(out)])
    assert read(out)["speedup"] == r["speedup"] > 0
    assert [row["images_per_s"] > 0 for row in r["rows"]] == [True, True]


def test_run_all_full_settings_name_every_setting_the_quick_ones_do():
    """Only --quick runs in CI: a setting missing from the full run would fail its step there only."""
    assert set(run_all._settings(quick=False)) == set(run_all._settings(quick=True))


def test_run_all_report_and_plot(tmp_path):
    """The report and the plot from a small, made-up result (the steps themselves are smoke-tested above)."""
    row = dict(
        concurrency=1,
        images_per_s=100.0,
        p50=1.5,
        p90=2.0,
        p99=3.0,
        max=4.0,
        error_count=0,
        errors={},
        generator_cpu_cores=0.1,
        server_cpu_cores=0.9,
        mean_batch_size=1.0,
        decode_ms=0.4,
        queue_wait_ms=0.01,
        forward_ms_per_batch=0.2,
        loadavg=[1.0, 1.0, 1.0],
    )
    rows = [
        row,
        {**row, "concurrency": 32, "images_per_s": 3200.0, "p99": 20.0},
        {**row, "concurrency": 64, "images_per_s": 2000.0},
    ]
    r = {
        "machine": {
            "cpu": "test cpu",
            "cores": 2,
            "loadavg": [1.0, 1.0, 1.0],
            "python": "3",
            "torch": "2",
            "grpcio": "1",
            "platform": "x",
        },
        "quick": True,
        "started": "then",
        "finished": "now",
        "data": "d",
        "loadavg_end": [1, 1, 1],
        "commands": {
            "inprocess": "a",
            "load_mlp": "b",
            "load_mlp_workers": "b2",
            "probe": "c",
            "torchserve": "d",
            "coldstart": "e",
            "coldstart_workers": "e2",
        },
        "inprocess": {
            "batch": 64,
            "duration_s": 1,
            "cores": 2,
            "ceiling_images_per_s": 3500.0,
            "rows": {"decode_2proc": {"images_per_s": 5000.0, "loadavg": [1, 1, 1]}},
        },
        "load_mlp": {"rows": rows, "server_ready_s": 2.0},
        "load_mlp_workers": {
            "rows": [{**r, "images_per_s": 2 * r["images_per_s"]} for r in rows],
            "server_ready_s": 3.0,
        },
        "probe": {
            "classify_ms": percentiles([1.0]),
            "probe_ms": percentiles([2.0]),
            "p50_ratio": 2.0,
            "calls": 1,
            "loadavg": [1, 1, 1],
        },
        "torchserve": {
            "torchserve_version": "0.12.0",
            "torchserve_settings": torchserve.SETTINGS,
            "max_probability_difference": 1e-6,
            "rows": [
                {
                    "concurrency": 32,
                    "torchserve": {**row, "images_per_s": 500.0},
                    "ours": {**row, "images_per_s": 800.0},
                    "throughput_ratio": 1.6,
                    "ours_workers": {**row, "images_per_s": 450.0},
                    "workers_throughput_ratio": 0.9,
                }
            ],
        },
        "coldstart": {
            "serving_s_median": 2.5,
            "runs": [{"serving_s": 2.5}],
            "loadavg": [1, 1, 1],
            "workers": {
                "serving_s_median": 5.5,
                "runs": [{"serving_s": 5.5}],
                "loadavg": [1, 1, 1],
                "server_args": ["--workers=2"],
            },
        },
    }
    verdicts = {t[0]: t[3] for t in run_all.targets(r)}
    assert verdicts["MLP throughput, concurrency 32"] == "**met**"
    assert verdicts["MLP throughput, concurrency 64"] == "**not met**"
    assert verdicts["MLP throughput, concurrency 64, --workers 2"] == "**met**"
    assert verdicts["p50 latency, concurrency 1"] == "**met**"
    assert verdicts["GradientProbe p50 / Classify p50, one image"] == "**met**"
    assert verdicts["... vs TorchServe 0.12.0, same run, concurrency 32"] == "**met**; **met**"
    assert verdicts["... vs TorchServe 0.12.0, same run, concurrency 32, --workers 2"] == "**not met**; **not met**"
    assert verdicts["cold start to SERVING, MLP"] == "**met**"
    assert verdicts["... with --workers=2 (the first worker SERVING)"] == "**not met**"
    png = run_all.plot(r, tmp_path / "throughput.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run_all.markdown(r, "throughput.png")
    assert "| 32 | 3200 |" in text and "test cpu" in text and "![throughput" in text
    assert "## Server under load: MLP, --workers 2" in text and "| 32 | 6400 |" in text
    assert "`e2`: process start to the first worker's health SERVING, median **5.50 s**" in text
    del r["commands"]["coldstart_workers"]  # a step reused from its file (--reuse): its command is in the file
    r["coldstart"]["workers"]["command"] = "e3"
    assert "`e3`: process start to the first worker's health SERVING" in run_all.markdown(r, "throughput.png")
    assert (
        "## TorchServe 0.12.0 side by side" in text
        and "| 32 | 500 |" in text
        and "| 1.60x | 450 |" in text
        and "| 0.90x |" in text
    )
    r["torchserve"]["rows"][0] = {
        k: v for k, v in r["torchserve"]["rows"][0].items() if not k.startswith(("ours_workers", "workers_"))
    }
    assert "| 1.60x | | | | | |" in run_all.markdown(r, None)  # a result from before the --workers column still renders
    r["torchserve"] = {"skipped": "torchserve not found"}
    assert "Skipped: torchserve not found." in run_all.markdown(r, None)


def test_pareto_smoke(tmp_path):
    """Train, quantize, measure and plot, for real, on a tiny data set (one epoch: the figures are not judged)."""
    data = tiny_image_folder(tmp_path / "data")
    out = tmp_path / "pareto.json"
    args = ["--data", str(data), "--arches", "mlp,cnn", "--cnn-seeds", "0,1", "--epochs", "1", "--models"]
    pareto.main([*args, str(tmp_path / "models"), "--duration", "0.5", "--warmup", "0.2", "--out", str(out)])
    r = read(out)
    rows = {row["name"]: row for row in r["rows"]}
    assert set(rows) == {"mlp", "cnn", "cnn-int8"}
    assert len(rows["cnn"]["accuracies"]) == 2 and 0 <= rows["cnn"]["accuracy_min"] <= rows["cnn"]["accuracy_mean"]
    assert rows["mlp"]["params"] > 6_000_000 > 107_857 == rows["cnn"]["params"] == rows["cnn-int8"]["params"]
    assert rows["cnn"]["macs"] == 11_010_112  # counted by hooks: a 2x2 stem, six 3x3 convolutions, one Linear
    assert 0.5 <= rows["cnn-int8"]["int8_label_agreement"] <= 1
    for row in rows.values():
        assert row["cpu_ms_per_image_b1"] > 0 and row["cpu_ms_per_image_b32"] > 0
        assert row["served"]["images_per_s"] > 0 and row["served"]["error_count"] == 0
    assert (tmp_path / "models" / "cnn" / "seed1" / "model.pt").is_file()  # --models keeps them for the next run
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_and_issue_13_targets():
    def row(name, accuracy, served, b1, b32):
        return dict(name=name, accuracy_mean=accuracy, accuracy_min=accuracy - 0.01, accuracies=[accuracy],
                    params=1, macs=1e6, cpu_ms_per_image_b1=b1, cpu_ms_per_image_b32=b32, train_seconds=[100.0],
                    int8_label_agreement=None, served={"images_per_s": served, "p99": 5.0})  # fmt: skip

    rows = [row("mlp", 0.70, 500, 0.5, 0.2), row("cnn", 0.975, 480, 0.6, 0.3), row("vgg", 0.96, 200, 3.0, 2.7)]
    assert pareto.pareto_front(rows) == {"mlp", "cnn"}  # vgg: less accurate and slower than the cnn
    r = {"pareto": {"rows": rows, "concurrency": 32, "seeds": [0], "cnn_seeds": [0]}}
    verdicts = {t[0]: (t[1], t[3]) for t in run_all.cnn_targets(r)}
    assert verdicts["CNN forward pass, CPU ms per image at batch 32: the first CNN / the default"][1] == "**met**"
    assert verdicts["CNN forward pass, CPU ms per image at batch 1: the first CNN / the default"][1] == "**met**"
    assert verdicts["CNN served img/s / the MLP's, 32 callers"] == ("0.96x (480 / 500)", "**met**")
    assert verdicts["default CNN validation accuracy, mean (min) of 1 seed(s)"][1] == "**met**"
    text = "\n".join(pareto.markdown(r["pareto"]))
    assert "| cnn | 0.975 / 0.965 |" in text and "| vgg |" in text and "**9.0x** cheaper at batch 32" in text


def test_tracing_smoke(tmp_path):
    out = tmp_path / "tracing.json"
    tracing_bench.main(
        ["--rounds", "1", "--duration", "0.5", "--warmup", "0.2", "--concurrency", "4", "--json", str(out)]
    )
    summary = read(out)["summary"]
    assert set(summary) == {"off", "100%", "1%"}
    assert summary["off"]["spans_exported"] == 0 and summary["100%"]["spans_exported"] > 0  # the sink received them
    assert all(s["errors"] == 0 and s["images_per_s"][0] > 0 for s in summary.values())


def test_faults_smoke(tmp_path):
    out = tmp_path / "faults.json"
    assert faults.main(["--only", "huge-image,overload", "--calls", "200", "--json", str(out)]) == 0
    results = read(out)
    assert results["huge-image"]["as_promised"] and "limit of 16777216" in results["huge-image"]["details"]
    assert set(results["overload"]["seen"]) <= {"OK", "RESOURCE_EXHAUSTED"}


def test_real_images_are_128_pngs():
    images = real_images(n=4)
    assert len(images) == 4
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "PNG" and img.size == (128, 128)


@pytest.mark.parametrize(
    "module",
    [
        "inprocess",
        "load",
        "grpc_floor",
        "probe",
        "coldstart",
        "run_all",
        "train_loop",
        "torchserve",
        "tracing",
        "faults",
        "models",
        "pareto",
    ],
)
def test_every_script_has_help(module):
    r = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "usage" in r.stdout


def _torchserve_messages():
    """TorchServe's PredictionsRequest and PredictionResponse (from its inference.proto), built with protobuf itself."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(
        name="ts_inference_test.proto", package="org.pytorch.serve.grpc.inference", syntax="proto3"
    )
    request = f.message_type.add(name="PredictionsRequest")
    request.field.add(name="model_name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    request.field.add(name="model_version", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    request.field.add(
        name="input",
        number=3,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=".org.pytorch.serve.grpc.inference.PredictionsRequest.InputEntry",
    )
    entry = request.nested_type.add(name="InputEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    response = f.message_type.add(name="PredictionResponse")
    response.field.add(name="prediction", number=1, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("org.pytorch.serve.grpc.inference.PredictionsRequest")),
        get(pool.FindMessageTypeByName("org.pytorch.serve.grpc.inference.PredictionResponse")),
    )


def test_torchserve_messages_are_what_protobuf_makes_of_its_proto():
    Request, Response = _torchserve_messages()
    image = real_images(n=1)[0]  # > 127 bytes: multi-byte lengths
    parsed = Request.FromString(torchserve.predictions_request(image, "bitmoji"))
    assert parsed.model_name == "bitmoji" and dict(parsed.input) == {"data": image}
    assert torchserve.prediction(Response(prediction=b"0.731059").SerializeToString()) == b"0.731059"
    with pytest.raises(ValueError, match="no prediction"):
        torchserve.prediction(b"")


def test_torchserve_comparison_is_skipped_without_torchserve(monkeypatch, tmp_path):
    monkeypatch.setattr(torchserve, "tool", lambda name: None)
    out = tmp_path / "ts.json"
    torchserve.main(["--concurrency", "1", "--duration", "0.1", "--json", str(out)])
    assert "torchserve not found" in read(out)["skipped"]


@pytest.mark.skipif(
    torchserve.missing() is not None, reason="torchserve is not installed (an optional extra: see bench/torchserve.py)"
)
def test_torchserve_smoke(mlp_model_file, tmp_path):
    out = tmp_path / "ts.json"
    torchserve.main(
        [
            "--model",
            str(mlp_model_file),
            "--concurrency",
            "2",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--json",
            str(out),
        ]
    )
    r = read(out)
    assert r["max_probability_difference"] <= 1e-4
    (row,) = r["rows"]
    for name in ("torchserve", "ours"):
        assert row[name]["images_per_s"] > 0 and row[name]["error_count"] == 0, name
