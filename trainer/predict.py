"""The lecture's `predict_unseen`: classify image files of any size and mode with an exported model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bitmoji.core import modelfile
from bitmoji.core.preprocess import load_image, to_model_input


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    probability: float  # of the positive class
    logit: float


def predict_files(model: modelfile.LoadedModel, paths: list[str | Path]) -> list[Prediction]:
    images = torch.stack([load_image(Path(p).read_bytes()) for p in paths])
    with torch.inference_mode():
        logits = model.module(to_model_input(images).to(model.device)).reshape(-1).float().cpu()
    positive = model.metadata.get("positive_class", "positive")
    negative = next((c for c in model.metadata.get("class_names", []) if c != positive), "negative")
    return [
        Prediction(str(p), positive if float(z) >= 0 else negative, float(torch.sigmoid(z)), float(z))
        for p, z in zip(paths, logits)
    ]


def plot_predictions(predictions: list[Prediction], path: str | Path) -> Path:
    """A grid of the images with their predicted label and probability, as in the lecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(predictions)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, predictions):
        with Image.open(p.path) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(f"{p.label} ({p.probability:.2f})\n{Path(p.path).name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
