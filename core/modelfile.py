"""The one place that writes and reads model files.

Today the format is TorchScript with its metadata as a JSON `_extra_files`
entry, so a server needs nothing but the file. TorchScript is deprecated
upstream (torch 2.14 warns on every `torch.jit` call); the user asked for it,
so its warnings are silenced here, only for those calls. Another format
(e.g. `torch.export`'s .pt2) would be one more branch in `load_model`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitmoji.core.preprocess import CHANNELS, IMAGE_SIZE, PREPROCESSING

METADATA_FILE = "bitmoji/metadata.json"
FORMAT_VERSION = 1


@contextlib.contextmanager
def quiet_torchscript():
    """Hide torch's "`torch.jit.*` is deprecated" FutureWarnings, and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


class ModelFileError(ValueError):
    """A model file that cannot be loaded or does not behave as a model should."""


@dataclass
class LoadedModel:
    """A model ready to run, with what the file says about it."""

    module: torch.jit.ScriptModule
    metadata: dict
    version: str
    path: str
    sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def input_shape(self) -> list[int] | None:
        """Shape of one input item (no batch dimension), if the metadata says."""
        shape = self.metadata.get("input", {}).get("shape")
        return list(shape) if shape else None

    @property
    def class_names(self) -> list[str] | None:
        return self.metadata.get("class_names")

    @property
    def positive_class(self) -> str | None:
        return self.metadata.get("positive_class")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_fingerprint(model: nn.Module) -> str:
    """A short hash of the weights: part of the model version."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def script(model: nn.Module) -> torch.jit.ScriptModule:
    with quiet_torchscript():
        return torch.jit.script(model)


def _atomic_save(scripted: torch.jit.ScriptModule, path: Path, metadata: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a watcher never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with quiet_torchscript():
            torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: json.dumps(metadata, indent=2, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_torchscript(
    model: nn.Module, path: str | os.PathLike, metadata: dict, example: torch.Tensor, atol: float = 1e-5
) -> Path:
    """Script `model`, check the copy against the eager model, and save it with `metadata`.

    The module stays unfrozen (frozen modules fold parameters into constants and
    then no gradient can be taken through them: GradientProbe needs them).
    The check runs on the reloaded file, so what is verified is what is served.
    """
    path = Path(path)
    model = model.eval().cpu()
    example = example.cpu()
    scripted = script(model)
    _atomic_save(scripted, path, metadata)
    loaded = load_model(path)
    with torch.inference_mode():
        expected = model(example)
        got = loaded.module(example)
        again = loaded.module(example)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=0):
        path.unlink()
        raise ModelFileError(
            f"exported model disagrees with the eager model "
            f"(max diff {float((got - expected).abs().max()):.3g} > {atol})"
        )
    if not torch.equal(got, again):
        path.unlink()
        raise ModelFileError("exported model is not deterministic in eval mode (is dropout still on?)")
    return path


def _load_torchscript(path: Path, device: torch.device) -> tuple[torch.jit.ScriptModule, dict]:
    extra = {METADATA_FILE: ""}
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:
        raise ModelFileError(
            f"{path}: not a loadable TorchScript file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    raw = extra[METADATA_FILE]
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: metadata is not valid JSON ({exc})") from None
    return module, metadata


def optimize_for_inference(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """An inference-only copy of a loaded module: frozen (weights become constants, so no parameters and
    no gradients) and passed through `torch.jit.optimize_for_inference` (on CPU it folds convolution +
    batch norm and runs convolutions through oneDNN). Raises whatever torch raises for a module it cannot
    freeze. The caller decides whether the copy is worth serving: it is 1.6x faster for the CNN at batch
    8-32 here, but 3x slower for the MLP at batch 1."""
    with quiet_torchscript():
        return torch.jit.optimize_for_inference(torch.jit.freeze(module.eval()))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file onto `device`, in eval mode. Only the operator names files: a TorchScript file is code."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    device = torch.device(device)
    module, metadata = _load_torchscript(path, device)
    module.eval()
    sha = file_sha256(path)
    version = metadata.get("model_version") or f"sha256-{sha[:12]}"
    return LoadedModel(module=module, metadata=metadata, version=version, path=str(path), sha256=sha, device=device)


def build_metadata(
    *,
    architecture: str,
    class_names: list[str],
    positive_class: str,
    model: nn.Module,
    hyperparameters: dict | None = None,
    metrics: dict | None = None,
    data_fingerprint: str | None = None,
) -> dict:
    """Everything a server (or a person) needs to know about the model, with nothing else at hand."""
    if positive_class not in class_names:
        raise ValueError(f"positive class {positive_class!r} is not one of {class_names}")
    created = dt.datetime.now(dt.UTC)
    return {
        "format_version": FORMAT_VERSION,
        "model_version": f"{architecture}-{created:%Y%m%dT%H%M%SZ}-{state_fingerprint(model)}",
        "architecture": architecture,
        "class_names": list(class_names),
        "positive_class": positive_class,
        "positive_index": class_names.index(positive_class),
        "input": {"kind": "image", "shape": [CHANNELS, *IMAGE_SIZE], "dtype": "float32", "range": [0.0, 1.0]},
        "output": {"kind": "logit", "shape": [1], "activation": "sigmoid"},
        "preprocessing": dict(PREPROCESSING),
        "hyperparameters": hyperparameters or {},
        "metrics": metrics or {},
        "data_fingerprint": data_fingerprint,
        "torch_version": torch.__version__,
        "created": created.isoformat(),
    }


def export_model(model: nn.Module, path: str | os.PathLike, metadata: dict) -> Path:
    """Script, verify (reloaded copy equals the eager model on a batch) and write `path`."""
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(4, *metadata["input"]["shape"], generator=generator)
    return export_torchscript(model, path, metadata, example)
