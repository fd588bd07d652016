"""The model repository on disk: what models and versions exist, and how each wants to be served.

Triton's layout: `DIR/<name>/<version>/model.pt`, versions are positive
integers (written as such: `1`, `12`, not `01`), and an optional
`DIR/<name>/config.json`:

    {
      "version_policy": {"latest": {"num_versions": 2}},   # or {"all": {}}, or {"specific": {"versions": [1, 3]}}
      "default_version": 1,                                # pin what calls naming no version get
      "canary": {"version": 2, "weight": 0.1},             # a share of those calls goes to another version
      "shadow": 2,                                         # ... or every one also runs on it, compared
      "max_batch_size": 32, "max_batch_delay_ms": 2.0, "max_queue": 1024, "model_threads": 2
    }

Every key is optional; the batching keys default to the server's flags, the
policy to `latest` 1 (Triton's default). The routing keys (default_version,
canary, shadow) are what the ModelRepository service's SetDefaultVersion and
SetTraffic set, kept in the repository: under --workers (where a management
call reaches one worker) and in GitOps-style roll-outs they are the way. A folder or file whose name is not a
model or version name is ignored (hidden `.tmp-*` folders of a publish in
progress, say). `--model FILE` is a repository of one model (`--model-name`,
default `bitmoji`) with one version, 1.

Nothing here loads a model or imports torch: this module only reads the
file system, and the names it returns come from it, never from a request.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION = re.compile(r"^[1-9][0-9]{0,17}$")
POLICIES = ("latest", "all", "specific")
BATCHING_KEYS = ("max_batch_size", "max_batch_delay_ms", "max_queue", "model_threads")


class RepositoryError(ValueError):
    """A repository or config.json the server cannot use; the message names the file and the problem."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions to serve, as Triton's version_policy: latest N, all, or specific ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> set[int]:
        versions = sorted(set(available))
        if self.kind == "all":
            return set(versions)
        if self.kind == "specific":
            return set(self.versions) & set(versions)
        return set(versions[-self.num_versions :])

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return "specific " + ", ".join(map(str, self.versions))
        return "all"


@dataclass(frozen=True)
class ModelConfig:
    """A model's config.json: its version policy, default version and batching (None: the server's flag)."""

    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    default_version: int | None = None
    canary_version: int | None = None
    canary_weight: float = 0.0
    shadow_version: int | None = None
    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    max_queue: int | None = None
    model_threads: int | None = None


@dataclass(frozen=True)
class ModelSource:
    """One model as the repository holds it: its version files and its configuration (or why it has none)."""

    name: str
    versions: dict[int, Path]
    config: ModelConfig = field(default_factory=ModelConfig)
    config_error: str = ""  # a config.json that cannot be used: nothing of this model is loaded, and its state says why


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise RepositoryError(
            f"{name!r} is not a model name: letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def parse_config(text: str, where: str) -> ModelConfig:
    """config.json's text -> ModelConfig; RepositoryError names `where` and the key that is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RepositoryError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise RepositoryError(f"{where}: expected a JSON object")
    unknown = set(raw) - {"version_policy", "default_version", "canary", "shadow", *BATCHING_KEYS}
    if unknown:
        raise RepositoryError(f"{where}: unknown keys {sorted(unknown)}")
    values: dict = {}
    for key in BATCHING_KEYS:
        if key in raw:
            value = raw[key]
            wanted = float if key == "max_batch_delay_ms" else int
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (wanted is int and value != int(value))
            ):
                raise RepositoryError(f"{where}: {key} must be a number{'' if wanted is float else ' (an integer)'}")
            if value < (0 if key == "max_batch_delay_ms" else 1):
                raise RepositoryError(f"{where}: {key} must be {'>= 0' if wanted is float else 'at least 1'}")
            values[key] = wanted(value)
    if "default_version" in raw:
        values["default_version"] = _positive(raw["default_version"], f"{where}: default_version")
    if "version_policy" in raw:
        values["version_policy"] = _policy(raw["version_policy"], where)
    if "shadow" in raw:
        values["shadow_version"] = _positive(raw["shadow"], f"{where}: shadow")
    if "canary" in raw:
        canary = raw["canary"]
        if not isinstance(canary, dict) or set(canary) != {"version", "weight"}:
            raise RepositoryError(f'{where}: canary must be {{"version": N, "weight": W}}')
        weight = canary["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise RepositoryError(f"{where}: canary weight must lie in [0, 1] (got {weight!r})")
        values["canary_version"] = _positive(canary["version"], f"{where}: canary version")
        values["canary_weight"] = float(weight)
    return ModelConfig(**values)


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RepositoryError(f"{what} must be a positive integer (got {value!r})")
    return value


def _policy(raw, where: str) -> VersionPolicy:
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in POLICIES:
        raise RepositoryError(
            f'{where}: version_policy must be one of {{"latest": {{"num_versions": N}}}}, {{"all": {{}}}}, '
            f'{{"specific": {{"versions": [...]}}}}'
        )
    kind, body = next(iter(raw.items()))
    body = body or {}
    if kind == "latest":
        return VersionPolicy("latest", _positive(body.get("num_versions", 1), f"{where}: num_versions"))
    if kind == "specific":
        versions = body.get("versions")
        if not isinstance(versions, list) or not versions:
            raise RepositoryError(f"{where}: specific needs a non-empty list of versions")
        return VersionPolicy("specific", versions=tuple(sorted(_positive(v, f"{where}: versions") for v in versions)))
    return VersionPolicy("all")


def scan(root: str | os.PathLike) -> dict[str, ModelSource]:
    """Every model under `root`, with its version files and config; RepositoryError if `root` is no folder."""
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"{root}: no such model repository (a folder of <name>/<version>/model.pt)")
    models = {}
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not NAME.match(folder.name):
            continue
        versions = {int(v.name): v / MODEL_FILE for v in folder.iterdir() if v.is_dir() and VERSION.match(v.name)}
        config, error = ModelConfig(), ""
        config_path = folder / CONFIG_FILE
        if config_path.is_file():
            try:
                config = parse_config(config_path.read_text(), str(config_path))
            except (RepositoryError, OSError, UnicodeDecodeError) as exc:
                error = str(exc)
        models[folder.name] = ModelSource(folder.name, dict(sorted(versions.items())), config, error)
    return models


def single_file(path: str | os.PathLike, name: str) -> dict[str, ModelSource]:
    """`--model FILE`: one model named `name`, version 1."""
    return {name: ModelSource(check_name(name), {1: Path(path)})}
