"""The dependency rules, checked in fresh interpreters: what importing each layer loads.

- the client imports nothing of ours but the generated stubs, and no torch, numpy or Pillow;
- core imports no trainer, server or client;
- the server never imports the trainer (or the client);
- the trainer never imports the server (or the client);
- the --workers supervisor (cli, config, workers, logs) imports no torch.
Also read from the source: no module of a layer names a forbidden one in an import.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from helpers import ROOT

LAYERS = {"client": ROOT / "client", "core": ROOT / "core", "server": ROOT / "server", "trainer": ROOT / "trainer"}
FORBIDDEN = {  # layer -> the bitmoji packages it must not import
    "client": {"bitmoji.core", "bitmoji.server", "bitmoji.trainer"},
    "core": {"bitmoji.client", "bitmoji.server", "bitmoji.trainer"},
    "server": {"bitmoji.client", "bitmoji.trainer"},
    "trainer": {"bitmoji.client", "bitmoji.server"},
}
HEAVY = {"torch", "numpy", "PIL", "torchvision"}


def modules_of(layer: str) -> list[str]:
    return sorted(
        f"bitmoji.{layer}" + ("" if p.stem == "__init__" else f".{p.stem}")
        for p in LAYERS[layer].glob("*.py")
        if p.stem != "__main__"
    )


def loaded_after_importing(modules: list[str]) -> set[str]:
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print('\\n'.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT / "tests"
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def top(names: set[str], packages: set[str]) -> set[str]:
    return {p for p in packages if any(n == p or n.startswith(p + ".") for n in names)}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_importing_a_layer_loads_none_it_must_not(layer):
    loaded = loaded_after_importing(modules_of(layer))
    assert not top(loaded, FORBIDDEN[layer]), top(loaded, FORBIDDEN[layer])
    if layer == "client":
        assert not top(loaded, HEAVY), top(loaded, HEAVY)


def test_the_supervisor_imports_no_torch():
    loaded = loaded_after_importing(["bitmoji.server.cli", "bitmoji.server.config", "bitmoji.server.workers"])
    assert not top(loaded, HEAVY | {"grpc"}), top(loaded, HEAVY | {"grpc"})


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_no_source_file_of_a_layer_names_a_forbidden_package(layer):
    offenders = []
    for path in LAYERS[layer].glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                    offenders.append(f"{path.name}:{node.lineno} imports {name}")
    assert not offenders, offenders
