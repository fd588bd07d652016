"""The client against the real server: a `python -m bitmoji.server` subprocess on a loopback port, real gRPC."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from helpers import free_port, start_server
from PIL import Image, ImageDraw

from bitmoji.client import AsyncBitmojiClient, BitmojiClient, BitmojiError, cli
from bitmoji.core.modelfile import file_sha256, load_model
from bitmoji.core.preprocess import load_image, to_model_input

ROOT = Path(__file__).resolve().parents[2]
SERVER_FLAGS = ("--max-batch-size", "8")  # fewer batch sizes to warm up on 2 cores
LECTURE_GRADIENTS = {  # the lecture's worked example: x = 1, target 3, squared error
    "hidden.weight": [[-0.3480], [-1.3032]],
    "hidden.bias": [-0.3480, -1.3032],
    "output.weight": [[-2.9191, -2.4229]],
    "output.bias": [-3.3142],
}


def make_images(directory: Path) -> list[Path]:
    """A few synthetic stickers in different sizes and modes (so the server resizes and converts)."""
    rng = np.random.default_rng(7)
    paths = []
    for i, (size, mode, fill) in enumerate(
        [((128, 128), "RGB", (255, 200, 40)), ((150, 200), "RGBA", (40, 90, 255, 255)), ((131, 97), "L", 230)]
    ):
        pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8).squeeze(
            -1 if mode == "L" else None
        )
        image = Image.fromarray(pixels, mode)
        ImageDraw.Draw(image).ellipse((10, 10, size[0] - 20, size[1] - 30), fill=fill)
        path = directory / f"sticker{i}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths


def make_images_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 200, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def expected_predictions(model_file: Path, paths: list[Path]):
    """(labels, probabilities, logits) of the in-process TorchScript model, preprocessed as the server does."""
    model = load_model(model_file)
    batch = to_model_input(torch.stack([load_image(p.read_bytes()) for p in paths]))
    with torch.inference_mode():
        logits = model.module(batch).reshape(-1)
    probabilities = torch.sigmoid(logits)
    negative = next(c for c in model.class_names if c != model.positive_class)
    labels = [model.positive_class if p >= 0.5 else negative for p in probabilities.tolist()]
    return labels, probabilities, logits


def assert_same_predictions(predictions, expected, version):
    labels, probabilities, logits = expected
    assert [p.label for p in predictions] == labels
    assert torch.allclose(torch.tensor([p.logit for p in predictions]), logits, atol=1e-4, rtol=0)
    assert torch.allclose(torch.tensor([p.probability for p in predictions]), probabilities, atol=1e-5, rtol=0)
    assert {p.model_version for p in predictions} == {"1"}  # the repository version (the file is `version`)


def answered(server, code: str, method: str = "Classify") -> float:
    """How many calls the server answered with `code`: its own count (attempts, retries included)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(v) for v in re.findall(rf'bitmoji_requests_total\{{code="{code}",method="{method}",[^}}]*\}} (\S+)', text)
    )


@pytest.fixture(scope="module")
def cnn_server(cnn_model_file):
    """One CNN server for the module: starting one costs seconds of warm-up on 2 cores."""
    server = start_server(cnn_model_file, *SERVER_FLAGS)
    yield server
    assert server.stop() == 0, server.output()


def test_every_item_kind_gets_the_in_process_predictions(cnn_server, cnn_model_file, tmp_path):
    paths = make_images(tmp_path)
    expected = expected_predictions(cnn_model_file, paths)
    version = load_model(cnn_model_file).version
    uint8 = [load_image(p.read_bytes()) for p in paths]
    kinds = {
        "str paths": [str(p) for p in paths],
        "Path paths": paths,
        "bytes": [p.read_bytes() for p in paths],
        "PIL images": [Image.open(p) for p in paths],
        "numpy uint8 arrays": [u.numpy() for u in uint8],
        "a 4-D float tensor": to_model_input(torch.stack(uint8)),
        "float64 arrays": [to_model_input(u).double().numpy() for u in uint8],
    }
    with BitmojiClient(cnn_server.target) as client:
        client.wait_until_serving(30)
        for kind, items in kinds.items():
            predictions = client.classify(items)
            assert len(predictions) == len(paths), kind
            assert_same_predictions(predictions, expected, version)
        (single,) = client.classify(paths[0])  # a lone item, not in a list
        assert single.label == expected[0][0]


def test_real_images_get_the_in_process_predictions(cnn_server, cnn_model_file, real_data):
    paths = sorted((real_data / "valid" / "tom").glob("*.png"))[:3] + sorted((real_data / "unseen").glob("*.png"))
    expected = expected_predictions(cnn_model_file, paths)
    with BitmojiClient(cnn_server.target) as client:
        assert_same_predictions(client.classify(paths), expected, load_model(cnn_model_file).version)


def test_model_info_describes_the_served_file(cnn_server, cnn_model_file):
    model = load_model(cnn_model_file)
    with BitmojiClient(cnn_server.target) as client:
        info = client.model_info()
        assert client.health() == "SERVING"
        assert client.health("bitmoji.v1.Classifier") == "SERVING"
    assert info.model_version == "1" and info.model_sha256 == file_sha256(cnn_model_file)
    assert info.architecture == "cnn" and info.class_names == ("eva", "not_eva") and info.positive_class == "eva"
    assert info.input_shape == (3, 128, 128) and info.metadata["model_version"] == model.version
    assert info.max_batch_size == 8 and "cpu" in info.device


def test_gradient_probe_reproduces_the_lecture_gradients(server_factory, toy_model_file):
    server = server_factory(toy_model_file)
    with BitmojiClient(server.target) as client:
        result = client.gradient_probe([torch.tensor([1.0])], [3.0], loss="mse", values=True, tensor_type="torch")
        summary_only = client.gradient_probe([np.array([1.0], dtype=np.float32)], 3, loss="mse")
        one = np.array([1.0], dtype=np.float32)
        as_lists = client.gradient_probe([one], 3, loss="mse", values=True, tensor_type="list")
    assert isinstance(summary_only.outputs, np.ndarray) and summary_only.outputs.dtype == np.float32  # "auto"
    hidden = as_lists.parameters["hidden.weight"].values  # nested lists in the parameter's shape, [2, 1]
    assert [len(row) for row in hidden] == [1, 1]
    assert [row[0] for row in hidden] == pytest.approx([-0.3480, -1.3032], abs=1e-4)
    assert isinstance(as_lists.outputs, list) and len(as_lists.outputs) == 1
    assert list(result.parameters) == ["hidden.weight", "hidden.bias", "output.weight", "output.bias"]
    for name, want in LECTURE_GRADIENTS.items():
        gradient = result.parameters[name]
        want = torch.tensor(want)
        assert gradient.shape == tuple(want.shape)
        assert torch.allclose(gradient.values, want, atol=1e-4), name
        assert gradient.norm == pytest.approx(float(want.norm()), abs=1e-4)
        assert gradient.max_abs == pytest.approx(float(want.abs().max()), abs=1e-4)
        assert gradient.mean_abs == pytest.approx(float(want.abs().mean()), abs=1e-4)
        assert summary_only.parameters[name].values is None
        assert summary_only.parameters[name].norm == pytest.approx(gradient.norm)
    output = 1 / (1 + np.exp(-2)) + 2 / (1 + np.exp(-1)) - 1  # 1.3429
    assert result.outputs.reshape(-1).tolist() == pytest.approx([output], abs=1e-4)
    assert result.loss == pytest.approx((output - 3) ** 2, abs=1e-4)
    assert len(result.input_gradients) == 1 and result.input_gradients[0].shape == (1,)
    assert result.saliency_pngs == [None]


def test_image_probe_gives_a_saliency_png_per_image(cnn_server, tmp_path):
    paths = make_images(tmp_path)[:2]
    with BitmojiClient(cnn_server.target) as client:
        result = client.gradient_probe(paths, [1, 0], saliency=True)
    assert result.loss > 0 and result.outputs.size == 2
    assert [g.shape for g in result.input_gradients] == [(3, 128, 128)] * 2
    for data in result.saliency_pngs:
        assert Image.open(io.BytesIO(data)).format == "PNG"


def test_server_errors_are_raised_once_and_not_retried(cnn_server):
    before = answered(cnn_server, "INVALID_ARGUMENT")
    with BitmojiClient(cnn_server.target) as client:
        with pytest.raises(BitmojiError) as info:
            client.classify([b"this is not an image"])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.details
        assert answered(cnn_server, "INVALID_ARGUMENT") == before + 1  # one attempt reached the server
        assert client.health() == "SERVING"  # and the server is still up


def test_a_full_queue_is_retried_within_the_budget(server_factory, cnn_model_file):
    """The real server's RESOURCE_EXHAUSTED (queue full) is retried by gRPC, and the retry budget keeps the
    attempts close to the calls made when most calls fail."""
    server = server_factory(cnn_model_file, "--max-batch-size", "4", "--max-queue", "8", "--max-items-per-call", "4")
    image = make_images_bytes()
    failed = []
    with BitmojiClient(server.target, retries=3, backoff=0.05) as client:
        client.wait_until_serving(30)

        def caller():
            for _ in range(10):
                try:
                    client.classify([image] * 4)
                except BitmojiError as error:
                    failed.append(error.code)

        callers = [threading.Thread(target=caller) for _ in range(16)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(120)
    refused, served = answered(server, "RESOURCE_EXHAUSTED"), answered(server, "OK")
    assert set(failed) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert served + len(failed) == 160  # every call ended: answered, or refused after its retries
    assert refused > len(failed)  # some refusals were retried (and some of those then answered)
    retries = refused + served - 160
    assert retries <= 5 + 0.1 * served  # the budget: 5 retries, then one per 10 successes; not 3 per failed call


def test_async_client_classifies_and_describes(cnn_server, cnn_model_file, tmp_path):
    paths = make_images(tmp_path)

    async def main():
        async with AsyncBitmojiClient(cnn_server.target) as client:
            await client.wait_until_serving(30)
            return await asyncio.gather(client.classify(paths), client.classify(paths[0]), client.model_info())

    predictions, single, info = asyncio.run(main())
    assert_same_predictions(predictions, expected_predictions(cnn_model_file, paths), info.model_version)
    assert single[0] == predictions[0]
    assert info.class_names == ("eva", "not_eva")


def run_cli(target: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BITMOJI_TARGET": target}
    return subprocess.run(
        [sys.executable, "-m", "bitmoji.client", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_end_to_end(cnn_server, tmp_path):
    paths = make_images(tmp_path)
    result = run_cli(cnn_server.target, "classify", *map(str, paths))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["file", "label", "probability", "logit"]
    rows = [line for line in lines[1:] if line.startswith(str(tmp_path))]
    assert len(rows) == len(paths) and lines[-1].startswith("model: bitmoji  version: 1  build: cnn-")  # what answered

    saliency = tmp_path / "saliency.png"
    result = run_cli(cnn_server.target, "probe", str(paths[0]), "--label", "eva", "--saliency", str(saliency))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("loss (bce, target 1)") and "features.0.0.weight" in result.stdout
    assert Image.open(saliency).format == "PNG"

    result = run_cli(cnn_server.target, "info")
    assert result.returncode == 0 and re.search(r"^architecture: +cnn$", result.stdout, re.M)
    # nested metadata as key.sub: value, lists joined, aligned; no Python dicts or lists
    assert re.search(r"^  input\.shape: +3, 128, 128$", result.stdout, re.M), result.stdout
    assert re.search(r"^  preprocessing\.\w+: ", result.stdout, re.M) and not re.search(r"[{}\[\]]", result.stdout)
    after = result.stdout.split("metadata:\n")[1].splitlines()
    metadata = after[: next((i for i, line in enumerate(after) if not line.startswith("  ")), len(after))]
    assert re.search(r"^versions of bitmoji:\n  version +state +build", result.stdout, re.M)  # the server's status
    assert len({re.match(r"  [^:]+: +", line).end() for line in metadata}) == 1  # values in one column

    assert run_cli(cnn_server.target, "health").stdout.strip() == "SERVING"
    assert run_cli(cnn_server.target, "health").returncode == 0
    unknown = run_cli(cnn_server.target, "health", "--service", "no.such.Service")
    assert (unknown.returncode, unknown.stdout.strip()) == (1, "SERVICE_UNKNOWN")

    bad = run_cli(cnn_server.target, "probe", str(paths[0]), "--label", "bob")
    assert bad.returncode == 1 and "neither a class name" in bad.stderr and "Traceback" not in bad.stderr

    down = run_cli(f"127.0.0.1:{free_port()}", "--timeout", "2", "health")  # nothing listens there
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr and down.stderr.count("\n") == 1


def test_cli_names_the_files_the_server_refused_and_classifies_the_rest(cnn_server, tmp_path, monkeypatch, capsys):
    paths = [str(p) for p in make_images(tmp_path)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    files = [paths[0], paths[1], paths[2], str(broken), paths[0], str(empty)]
    monkeypatch.setattr(cli, "CLASSIFY_CHUNK", 4)  # broken.png is inputs[3] of call 1, empty.png inputs[1] of call 2
    code = cli.main(["--target", cnn_server.target, "classify", *files])
    out, err = capsys.readouterr()
    assert code == 1
    assert [line.split(":")[0] for line in err.splitlines()] == ["bitmoji-client"] * 2
    assert err.splitlines()[0].startswith(f"bitmoji-client: {broken}: ") and "inputs[" not in err
    assert err.splitlines()[1].startswith(f"bitmoji-client: {empty}: ")
    rows = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert rows == [paths[0], paths[1], paths[2], paths[0]]  # the good ones, in order

    assert cli.main(["--target", cnn_server.target, "--json", "classify", str(broken), paths[1]]) == 1
    answers = json.loads(capsys.readouterr().out)
    assert answers[0]["file"] == str(broken) and "error" in answers[0] and answers[1]["label"] in ("eva", "not_eva")
