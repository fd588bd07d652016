"""Tests for bitmoji.trainer.synth, the embedded default data set generator."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from bitmoji.trainer import synth

SMALL = dict(n_train=16, n_valid=8, progress=False)


def _pngs(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> pathlib.Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "data", seed=3, **SMALL)


def test_layout_counts_size_and_mode(small_set):
    assert synth.CLASSES == ("eva", "not_eva")
    for split, total in (("train", 16), ("valid", 8)):
        assert sorted(p.name for p in (small_set / split).iterdir()) == ["eva", "not_eva"]
        for name in synth.CLASSES:
            files = sorted((small_set / split / name).glob("*.png"))
            assert [f.name for f in files] == [f"{name}_{i:05d}.png" for i in range(total // 2)]
            for f in files:
                with Image.open(f) as image:
                    assert image.format == "PNG"
                    assert image.mode == "RGB"
                    assert image.size == (128, 128)
    manifest = json.loads((small_set / "synth.json").read_text())
    assert manifest["seed"] == 3 and manifest["n_train"] == 16 and manifest["n_valid"] == 8


def test_size_parameter(tmp_path):
    out = synth.generate(tmp_path / "d", n_train=2, n_valid=2, size=64, progress=False)
    with Image.open(out / "train" / "eva" / "eva_00000.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"


def test_rejects_odd_counts(tmp_path):
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "d", n_train=15, n_valid=8, progress=False)


def test_same_seed_is_byte_identical(small_set, tmp_path):
    again = synth.generate(tmp_path / "again", seed=3, **SMALL)
    assert _pngs(again) == _pngs(small_set)


def test_different_seed_differs(small_set, tmp_path):
    other = _pngs(synth.generate(tmp_path / "other", seed=4, **SMALL))
    first = _pngs(small_set)
    assert other.keys() == first.keys()
    differing = sum(other[k] != first[k] for k in first)
    assert differing == len(first)


def test_train_and_valid_share_no_image(small_set):
    digest = lambda p: hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()  # noqa: E731
    train = {digest(p) for p in (small_set / "train").rglob("*.png")}
    valid = {digest(p) for p in (small_set / "valid").rglob("*.png")}
    assert len(train) == 16 and len(valid) == 8  # no duplicates inside a split either
    assert not train & valid


def test_second_call_does_not_rewrite(tmp_path):
    out = synth.generate(tmp_path / "d", **SMALL)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert synth.generate(tmp_path / "d", **SMALL) == out
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_regenerates_when_parameters_change(tmp_path):
    out = synth.generate(tmp_path / "d", seed=0, **SMALL)
    first = _pngs(out)
    synth.generate(tmp_path / "d", seed=1, **SMALL)
    assert json.loads((out / "synth.json").read_text())["seed"] == 1
    assert _pngs(out) != first

    synth.generate(tmp_path / "d", seed=1, n_train=8, n_valid=4, progress=False)
    assert len(list((out / "train" / "eva").glob("*.png"))) == 4  # stale files are gone
    assert len(list((out / "valid" / "not_eva").glob("*.png"))) == 2


def test_regenerates_incomplete_set(tmp_path):
    out = synth.generate(tmp_path / "d", **SMALL)
    victim = out / "valid" / "not_eva" / "not_eva_00001.png"
    expected = victim.read_bytes()
    victim.unlink()
    synth.generate(tmp_path / "d", **SMALL)
    assert victim.read_bytes() == expected


def test_progress_goes_to_stderr(tmp_path, capsys):
    # Not a terminal here, so no bar (tqdm's disable=None), but the summary line still reports progress.
    synth.generate(tmp_path / "d", n_train=2, n_valid=2, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "wrote 4 images" in captured.err and "it/s" not in captured.err and "img/s" not in captured.err


def _fit_logistic(features: np.ndarray, labels: np.ndarray, steps: int = 2000) -> float:
    """In-sample accuracy of a logistic regression (plain gradient descent)."""
    z = (features - features.mean(0)) / (features.std(0) + 1e-9)
    z = np.c_[z, z**2, np.ones(len(z))]  # quadratic terms: also catches "extreme colours" cues
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ w))
        w -= 0.5 * z.T @ (p - labels) / len(labels)
    return float(((z @ w > 0) == labels).mean())


def test_mean_colour_is_not_a_cue(tmp_path):
    out = synth.generate(tmp_path / "d", n_train=200, n_valid=2, seed=11, progress=False)
    means = {
        name: np.array(
            [
                np.asarray(Image.open(p), dtype=np.float64).reshape(-1, 3).mean(0)
                for p in sorted((out / "train" / name).glob("*.png"))
            ]
        )
        for name in synth.CLASSES
    }
    features = np.concatenate([means["eva"], means["not_eva"]])
    labels = np.r_[np.ones(100), np.zeros(100)]
    spread = features.std(0)
    effect = np.abs(means["eva"].mean(0) - means["not_eva"].mean(0)) / spread
    assert np.all(effect < 0.25), effect
    assert _fit_logistic(features, labels) < 0.65
