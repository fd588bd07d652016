"""How `bitmoji-client` shows results to a person: aligned tables and `name: value` blocks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from bitmoji.client.results import ModelInfo, ModelList, ModelStatus, ModelVersionStatus


def table(header: Sequence[str], rows: Sequence[Sequence[object]], float_format: str = ".4f") -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [list(header)] + [
        [format(c, float_format) if isinstance(c, float) else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]
    lines = []
    for row in cells:
        padded = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def value_text(value: Any) -> str:
    """One value as a person reads it: no quotes, no brackets, "-" for nothing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, (list, tuple)):
        return ", ".join(value_text(v) for v in value) or "-"
    if isinstance(value, dict) and not value:
        return "-"
    return str(value)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts (JSON metadata) as `key.sub` names; lists of plain values joined with ", ",
    lists holding dicts or lists numbered (`key.0.sub`)."""
    if isinstance(value, dict) and value:
        pairs: list[tuple[str, str]] = []
        for key, sub in value.items():
            pairs += flatten(sub, f"{prefix}.{key}" if prefix else str(key))
        return pairs
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return [pair for i, sub in enumerate(value) for pair in flatten(sub, f"{prefix}.{i}" if prefix else str(i))]
    return [(prefix, value_text(value))]


def fields(pairs: Iterable[tuple[str, object]], indent: str = "") -> list[str]:
    """`name: value` lines, the values aligned."""
    pairs = list(pairs)
    width = max((len(name) for name, _ in pairs), default=0) + 1
    return [f"{indent}{name + ':':<{width}} {value_text(value)}".rstrip() for name, value in pairs]


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.0f} MiB" if size > 0 else "-"


def routing(model: ModelStatus, version: ModelVersionStatus) -> str:
    """Where the calls that name no version go, as it concerns this version."""
    roles = []
    if version.version == model.default_version:
        roles.append("default (pinned)" if model.default_pinned else "default")
    if version.version == model.canary_version:
        roles.append(f"canary {model.canary_weight:.0%}")
    if version.version == model.shadow_version:
        roles.append("shadow")
    return ", ".join(roles)


def models_table(models: Iterable[ModelStatus], *, with_name: bool = True) -> str:
    header: tuple[str, ...] = ("model", "version", "state", "routing", "build", "memory", "reason")
    rows: list[tuple[str, ...]] = [
        (m.name, v.version, v.state, routing(m, v) or "-", v.build or "-", mebibytes(v.memory_bytes), v.reason or "-")
        for m in models
        for v in m.versions
    ]
    if not with_name:
        header, rows = header[1:], [row[1:] for row in rows]
    return table(header, rows)


def traffic_lines(model: ModelStatus, indent: str = "") -> list[str]:
    """The default, canary and shadow of one model."""
    default = model.default_version or "none READY"
    if model.default_pinned:
        default += " (pinned)"
    if model.previous_default_version:
        default += f"; before: {model.previous_default_version}"
    canary = (
        f"{model.canary_version} ({model.canary_weight:.0%} of the calls naming no version)"
        if model.canary_version
        else "-"
    )
    return fields([("default", default), ("canary", canary), ("shadow", model.shadow_version or "-")], indent)


def model_status_text(model: ModelStatus) -> str:
    """One model: its versions and where calls go (after a load, unload, promote, roll back, traffic)."""
    lines = [f"model {model.name}:"]
    if model.versions:
        lines += ["  " + line for line in models_table([model], with_name=False).splitlines()]
    else:
        lines.append("  no versions")
    return "\n".join(lines + traffic_lines(model, "  "))


def model_list_text(models: ModelList) -> str:
    if not models.models:
        return "no models"
    lines = [models_table(models)]
    for model in models:
        canary = f"canary {model.canary_version} ({model.canary_weight:.0%})" if model.canary_version else ""
        shadow = f"shadow {model.shadow_version}" if model.shadow_version else ""
        extra = ", ".join(x for x in (canary, shadow) if x)
        if extra:
            lines.append(f"{model.name}: {extra}")
    lines.append(f"default model: {models.default_model or '-'}")
    return "\n".join(lines)


def answered_by(triples: Iterable[tuple[str, str, str]]) -> str:
    """`model: cnn  version: 2  build: cnn-...`, once per distinct answerer (a reload or a canary adds one)."""
    shown = []
    for name, version, build in dict.fromkeys(triples):
        parts = [("model", name), ("version", version), ("build", build)]
        shown.append("  ".join(f"{label}: {value}" for label, value in parts if value))
    return "; ".join(shown)


def info_text(info: ModelInfo) -> str:
    lines = fields(
        [
            ("model name", info.model_name),
            ("model version", info.model_version),
            ("model build", info.model_build),
            ("architecture", info.architecture),
            ("classes", info.class_names),
            ("positive class", info.positive_class),
            ("input shape", "x".join(map(str, info.input_shape))),
            ("device", info.device),
            ("torch threads", info.torch_threads),
            ("max batch size", info.max_batch_size),
            ("max batch delay", f"{info.max_batch_delay_ms:g} ms"),
            ("max items per call", info.max_items_per_call),
            ("gradient probe", "enabled" if info.gradient_probe_enabled else "disabled"),
            ("model sha256", info.model_sha256),
        ]
    )
    if info.metadata:
        lines += ["metadata:", *fields(flatten(info.metadata), "  ")]
    if info.status is not None:
        lines.append(f"versions of {info.status.name or 'the model'}:")
        if info.status.versions:
            header = ("version", "state", "build", "reason")
            rows = [(v.version, v.state, v.build or "-", v.reason or "-") for v in info.status.versions]
            lines += ["  " + line for line in table(header, rows).splitlines()]
        lines += traffic_lines(info.status, "  ")
    return "\n".join(lines)
