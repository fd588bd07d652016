"""The trainer end to end: synthetic data -> fit -> TorchScript -> reload -> predict; resume; the real data."""

import json
import subprocess
import sys

import pytest
import torch

from bitmoji.core import modelfile
from bitmoji.trainer import plots, synth
from bitmoji.trainer.predict import predict_files
from bitmoji.trainer.train import TrainConfig, fit


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "synth", n_train=48, n_valid=16, seed=3, progress=False)


@pytest.mark.slow
def test_end_to_end_fit_export_reload_predict(small_synth, tmp_path, monkeypatch):
    titles = []
    real_plot_curves = plots.plot_curves
    monkeypatch.setattr(plots, "plot_curves", lambda *a, **kw: titles.append(kw["title"]) or real_plot_curves(*a, **kw))
    result = fit(
        TrainConfig(data=str(small_synth), out=str(tmp_path), arch="cnn", epochs=2, batch_size=16, progress=False)
    )
    for name in ("model.pt", "history.json", "history.csv", "curves.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert set(history[0]) >= {"train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "grad_norms"}
    assert all(v >= 0 for v in history[0]["grad_norms"].values())
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert titles == [f"cnn: eva vs not_eva (48 train / 16 valid images, {small_synth})"]

    loaded = modelfile.load_model(tmp_path / "model.pt")
    meta = loaded.metadata
    assert meta["class_names"] == ["eva", "not_eva"] and meta["positive_class"] == "eva"
    assert meta["architecture"] == "cnn" and meta["input"]["shape"] == [3, 128, 128]
    assert meta["hyperparameters"]["epochs"] == 2 and meta["data_fingerprint"]
    assert meta["metrics"]["best"]["epoch"] == result.best_epoch  # the lowest valid loss, for the record
    assert meta["metrics"]["served"]["epoch"] == meta["metrics"]["served_epoch"] == 2  # the cnn exports its last
    assert loaded.version == meta["model_version"]
    # unfrozen: gradients can still be taken through the served module
    assert all(p.requires_grad for p in loaded.module.parameters())

    files = (
        sorted((small_synth / "valid" / "eva").glob("*.png"))[:3]
        + sorted((small_synth / "valid" / "not_eva").glob("*.png"))[:3]
    )
    predictions = predict_files(loaded, files)
    # the reloaded file classifies any image file: labels follow the sign of the logit
    assert len(predictions) == 6 and all(p.label in ("eva", "not_eva") for p in predictions)
    assert all(0.0 <= p.probability <= 1.0 for p in predictions)
    assert all((p.label == "eva") == (p.logit >= 0) for p in predictions)


@pytest.mark.slow
def test_same_seed_same_history(small_synth, tmp_path):
    a = fit(
        TrainConfig(
            data=str(small_synth), out=str(tmp_path / "a"), arch="mlp", epochs=2, batch_size=16, seed=7, progress=False
        )
    )
    b = fit(
        TrainConfig(
            data=str(small_synth), out=str(tmp_path / "b"), arch="mlp", epochs=2, batch_size=16, seed=7, progress=False
        )
    )
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(small_synth, tmp_path):
    # no schedule: the interrupted run's shorter --epochs would change a cosine schedule's length
    common = dict(data=str(small_synth), arch="cnn", batch_size=16, seed=1, progress=False, schedule="none")
    straight = fit(TrainConfig(out=str(tmp_path / "straight"), epochs=3, **common))
    fit(TrainConfig(out=str(tmp_path / "split"), epochs=1, **common))
    resumed = fit(TrainConfig(out=str(tmp_path / "split"), epochs=3, resume=True, **common))
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    a = modelfile.load_model(straight.model_path).module.state_dict()
    b = modelfile.load_model(resumed.model_path).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_early_stopping_stops_and_restores_best(small_synth, tmp_path):
    # a huge learning rate makes the valid loss bounce; patience 1 stops at the first bad epoch
    result = fit(
        TrainConfig(
            data=str(small_synth),
            out=str(tmp_path),
            arch="mlp",
            epochs=15,
            lr=0.05,
            batch_size=16,
            patience=1,
            progress=False,
        )
    )
    assert len(result.history) < 15 and "early stop" in result.stop_reason
    best = min(result.history, key=lambda row: row["valid_loss"])
    assert result.best_epoch == best["epoch"]
    assert result.metadata["metrics"]["served_epoch"] == best["epoch"]


@pytest.mark.slow
def test_cli_synth_fit_predict(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bitmoji.trainer", *args], capture_output=True, text=True, timeout=300
        )

    r = run("synth", "--out", str(tmp_path / "d"), "--n-train", "16", "--n-valid", "8")
    assert r.returncode == 0, r.stderr
    r = run(
        "fit",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "o"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--no-progress",
        "--repository",
        str(tmp_path / "repo"),
    )
    assert r.returncode == 0, r.stderr
    assert "Epoch 1: Train Loss" in r.stdout and "Valid Accuracy" in r.stdout
    published = tmp_path / "repo" / "mlp" / "1" / "model.pt"  # --name defaults to the --arch
    assert r.stdout.splitlines()[-1] == f"published {published}"
    assert published.read_bytes() == (tmp_path / "o" / "model.pt").read_bytes()
    assert (
        "FutureWarning" not in r.stderr and "deprecated" not in r.stderr
    )  # TorchScript's warnings stay out of users' faces
    image = sorted((tmp_path / "d" / "valid" / "eva").glob("*.png"))[0]
    r = run("predict", "--model", str(tmp_path / "o" / "model.pt"), str(image), "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    assert image.name in r.stdout and (tmp_path / "p.png").exists()
    r = run("fit", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "no such data folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.real_data
@pytest.mark.slow
def test_real_data_short_mlp_beats_chance(real_data, tmp_path):
    # The lecture's MLP and defaults (Adam, lr 1e-4, batch 64) crawl off chance for ~4 epochs, then reach
    # 0.60-0.65 (the lecture reports 0.60-0.67). 0.57 on 200 balanced images is 2 sigma above chance.
    result = fit(
        TrainConfig(data=str(real_data), out=str(tmp_path), arch="mlp", epochs=8, seed=0, threads=2, progress=False)
    )
    served = result.metadata["metrics"]["served"]
    assert served["valid_accuracy"] > 0.57, served


@pytest.mark.real_data
def test_predict_unseen_any_size_and_mode(real_data, mlp_model_file):
    files = sorted((real_data / "unseen").glob("*"))
    predictions = predict_files(modelfile.load_model(mlp_model_file), files)
    assert len(predictions) == len(files) == 5
