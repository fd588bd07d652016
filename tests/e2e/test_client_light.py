"""The client as a service installs it: `pip install .` without extras into a fresh virtualenv (grpcio,
grpcio-health-checking, protobuf; no torch, numpy or Pillow), talking to the real server.

Slow (a virtualenv and a pip install from the configured registries, about a minute): `-m slow` selects it.
It prints the fresh environment's size and `import bitmoji.client`'s time (`-s` shows them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_client import make_images

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "proto", "core", "server", "trainer", "client")
HEAVY = ("torch", "numpy", "PIL")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    """A virtualenv with the project installed as `pip install <checkout>` does it, from a copy of the
    checkout's sources (so the build writes nothing into the working tree)."""
    base = tmp_path_factory.mktemp("light")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    install = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--progress-bar", "off", source],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


def run(venv: Path, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, cwd=venv)


def test_the_base_install_has_no_torch_numpy_or_pillow(light_venv):
    listed = run(light_venv, light_venv / "bin" / "python", "-m", "pip", "list", "--format", "json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"bitmoji-serving", "grpcio", "grpcio-health-checking", "protobuf"} <= names
    assert not names & {"torch", "numpy", "pillow", "torchvision"}, names
    size = int(subprocess.run(["du", "-sb", light_venv], capture_output=True, text=True).stdout.split()[0])
    importtime = run(light_venv, light_venv / "bin" / "python", "-X", "importtime", "-c", "import bitmoji.client")
    total = int(re.search(r"\|\s+(\d+) \| bitmoji\.client\n", importtime.stderr).group(1))
    print(f"\nbase install: {size / 2**20:.1f} MiB on disk; import bitmoji.client: {total / 1000:.0f} ms")
    assert size < 200 * 2**20  # grpcio and protobuf, not a 5.7 GB torch environment


def test_every_command_and_both_clients_work_without_them(light_venv, server_factory, cnn_model_file, tmp_path):
    server = server_factory(cnn_model_file, "--max-batch-size", "8")
    paths = [str(p) for p in make_images(tmp_path)]
    client = light_venv / "bin" / "bitmoji-client"

    health = run(light_venv, client, "--target", server.target, "health")
    assert (health.returncode, health.stdout) == (0, "SERVING\n"), health.stderr
    info = run(light_venv, client, "--target", server.target, "info")
    assert info.returncode == 0 and re.search(r"^architecture: +cnn$", info.stdout, re.M), info.stderr
    classify = run(light_venv, client, "--target", server.target, "classify", *paths)
    assert classify.returncode == 0, classify.stderr
    assert [line.split()[0] for line in classify.stdout.splitlines()[1:-1]] == paths
    saliency = tmp_path / "saliency.png"
    probe = run(
        light_venv, client, "--target", server.target, "probe", paths[0], "--label", "eva", "--saliency", saliency
    )
    assert probe.returncode == 0 and probe.stdout.startswith("loss (bce, target 1)"), probe.stderr
    assert saliency.read_bytes().startswith(b"\x89PNG")

    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        from bitmoji.client import AsyncBitmojiClient, BitmojiClient

        paths = {paths!r}
        with BitmojiClient({server.target!r}) as client:
            predictions = client.classify(paths)
            probe = client.gradient_probe(paths[:2], [1.0, 0.0], values=True)
            info = client.model_info()
            try:
                client.gradient_probe(paths[:1], [1.0], tensor_type="torch")
                torch_error = None
            except ImportError as error:
                torch_error = str(error)

        async def main():
            async with AsyncBitmojiClient({server.target!r}) as client:
                return await client.classify(paths[0])

        (single,) = asyncio.run(main())
        print(json.dumps({{
            "labels": [p.label for p in predictions],
            "single": single.label == predictions[0].label and abs(single.logit - predictions[0].logit) < 1e-5,
            "outputs": probe.outputs,
            "gradient_shape": [len(probe.input_gradients[0]), len(probe.input_gradients[0][0])],
            "weights": type(next(iter(probe.parameters.values())).values).__name__,
            "classes": list(info.class_names),
            "torch_error": torch_error,
            "loaded": sorted(m for m in {HEAVY!r} if m in sys.modules),
        }}))
        """
    )
    result = run(light_venv, light_venv / "bin" / "python", "-c", script)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer["labels"]) <= {"eva", "not_eva"} and len(answer["labels"]) == 3
    assert answer["single"] and answer["classes"] == ["eva", "not_eva"]
    assert len(answer["outputs"]) == 2 and all(len(row) == 1 for row in answer["outputs"])  # [2, 1], nested lists
    assert answer["gradient_shape"] == [3, 128] and answer["weights"] == "list"
    assert "tensor_type='torch' needs torch, which is not installed" in answer["torch_error"]
    assert answer["loaded"] == []
