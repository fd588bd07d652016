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
        for p, z in zip(paths, logits, strict=True)
    ]


def grid_rows(n: int, max_columns: int = 5) -> list[int]:
    """How many images each row of the plot holds: as few rows as `max_columns` allows, lengths within one.

    6 -> [3, 3], 7 -> [4, 3], 10 -> [5, 5], 11 -> [4, 4, 3]: never a lone image under a full row.
    """
    if n < 1 or max_columns < 1:
        raise ValueError(f"need at least one image and one column, got {n} and {max_columns}")
    rows = -(-n // max_columns)
    longer = n % rows  # the first `longer` rows take one image more
    return [n // rows + (row < longer) for row in range(rows)]


def plot_predictions(predictions: list[Prediction], path: str | Path, cell_inches: float = 3.0) -> Path:
    """A grid of the images with their predicted label and probability, as in the lecture.

    Rows are balanced by `grid_rows` and a shorter row is centred; each image gets `cell_inches` (300 px).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec
    from PIL import Image

    rows = grid_rows(len(predictions))
    columns = max(rows)
    fig = plt.figure(figsize=(cell_inches * columns, (cell_inches + 0.4) * len(rows)))
    grid = GridSpec(len(rows), 2 * columns, figure=fig)  # half-cells, so a row one image short is centred
    images = iter(predictions)
    for row, count in enumerate(rows):
        offset = columns - count
        for column in range(count):
            p = next(images)
            ax = fig.add_subplot(grid[row, offset + 2 * column : offset + 2 * column + 2])
            ax.axis("off")
            with Image.open(p.path) as img:
                ax.imshow(img.convert("RGB"))
            ax.set_title(f"{p.label} ({p.probability:.2f})\n{Path(p.path).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
