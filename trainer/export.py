"""Turn a trained model into the self-describing TorchScript file the server loads."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import torch
from torch import nn

from trainer import modelfile
from trainer.preprocess import CHANNELS, IMAGE_SIZE, PREPROCESSING


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
    created = dt.datetime.now(dt.timezone.utc)
    return {
        "format_version": modelfile.FORMAT_VERSION,
        "model_version": f"{architecture}-{created:%Y%m%dT%H%M%SZ}-{modelfile.state_fingerprint(model)}",
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
    return modelfile.export_torchscript(model, path, metadata, example)
