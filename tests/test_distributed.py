"""Data-parallel training under torchrun (2 processes, gloo on CPU) gives the one-process result, and stops together."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from bitmoji.core import modelfile
from bitmoji.trainer import distributed, synth
from bitmoji.trainer.data import load_split
from bitmoji.trainer.models import build_model
from bitmoji.trainer.train import TrainConfig, TrainingError, evaluate, fit

# the MLP without dropout or augmentation: nothing random but the shuffling, which every rank draws alike;
# lr 1e-3 and patience 1 make this run stop early at epoch 4 (of 15), with accuracies that move
FLAGS = [
    "--arch",
    "mlp",
    "--dropout",
    "0",
    "--no-augment",
    "--batch-size",
    "16",
    "--lr",
    "1e-3",
    "--patience",
    "1",
    "--seed",
    "5",
]
CONFIG = dict(arch="mlp", dropout=0.0, augment=False, batch_size=16, lr=1e-3, patience=1, seed=5, progress=False)
OUTPUTS = ["checkpoint.pt", "curves.png", "history.csv", "history.json", "model.pt"]
pytestmark = pytest.mark.slow  # torchrun starts processes; each test trains


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("data") / "synth", n_train=32, n_valid=16, seed=3, progress=False)


def torchrun_fit(data, out, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 --standalone -m trainer fit ...`;
    a hang fails the test (and its processes are killed).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    cmd += [
        "-m",
        "bitmoji.trainer",
        "fit",
        "--data",
        str(data),
        "--out",
        str(out),
        *FLAGS,
        "--threads",
        "1",
        "--no-progress",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session this test started
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout}s (a rank hung?)\n{stdout}\n{stderr}")
    assert proc.returncode == 0, stdout + stderr
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """One training, twice: 2 processes (epoch 1, then --resume until it stops early), and 1 process."""
    out = tmp_path_factory.mktemp("runs")
    torchrun_fit(tiny, out / "ddp", "--epochs", "1")
    resumed = torchrun_fit(tiny, out / "ddp", "--epochs", "15", "--resume")
    one = fit(TrainConfig(data=str(tiny), out=str(out / "one"), epochs=15, **CONFIG))
    return out / "ddp", resumed.stdout, one


def test_rank_0_alone_prints_and_writes(runs):
    ddp, stdout, _ = runs
    assert "data parallel: 2 processes, 8 samples each per batch of 16" in stdout and "resumed from" in stdout
    assert stdout.count("Epoch 2:") == 1 and stdout.count(f"wrote {ddp / 'model.pt'}") == 1, stdout
    assert sorted(p.name for p in ddp.iterdir()) == OUTPUTS
    assert modelfile.load_model(ddp / "model.pt").metadata["hyperparameters"]["processes"] == 2
    rng = torch.load(ddp / "checkpoint.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # each rank's own dropout stream, kept


def test_two_processes_match_one_process(runs):
    ddp, _, one = runs
    history = json.loads((ddp / "history.json").read_text())
    assert [row["epoch"] for row in history] == [row["epoch"] for row in one.history]
    for a, b in zip(history, one.history, strict=True):
        for key in ("train_loss", "valid_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["epoch"], key)
        for key in ("train_accuracy", "valid_accuracy"):
            assert a[key] == b[key], (a["epoch"], key)
        assert a["grad_norms"] == pytest.approx(b["grad_norms"], rel=1e-3), a["epoch"]
    x = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ddp_logits = modelfile.load_model(ddp / "model.pt").module(x)
        one_logits = modelfile.load_model(one.model_path).module(x)
    torch.testing.assert_close(ddp_logits, one_logits, atol=1e-4, rtol=1e-4)


def test_early_stopping_stops_every_rank(runs):
    # both ranks left the loop at the same epoch: torchrun exited 0
    # (a rank left behind errors or hangs in its next collective)
    ddp, stdout, _ = runs
    history = json.loads((ddp / "history.json").read_text())
    assert 2 <= len(history) < 15
    assert stdout.count("early stop at epoch") == 1 and f"early stop at epoch {len(history)}:" in stdout


def test_global_batch_must_divide_among_processes(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(TrainingError, match="global batch"):
        fit(TrainConfig(data=str(tiny), out=str(tmp_path), batch_size=15, progress=False))


def test_validation_shards_count_every_sample_once(tiny, monkeypatch):
    # 16 images over 3 ranks (6 + 5 + 5): a padded sampler would count 2 of them twice
    valid = load_split(tiny, "valid", progress=False)
    model = build_model("mlp", dropout=0.0)
    whole = evaluate(model, valid, torch.device("cpu"))
    sums = []
    monkeypatch.setattr(distributed, "all_sum", lambda values: sums.append(values) or values)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        evaluate(model, valid, torch.device("cpu"))
    loss_sum, correct, count = (sum(column) for column in zip(*sums, strict=True))
    assert count == len(valid) == 16
    assert loss_sum / count == pytest.approx(whole[0], abs=1e-6) and correct / count == whole[1]
