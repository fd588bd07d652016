"""Training curves as a PNG: loss and accuracy, train vs valid, with the early-stopping point marked."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_curves(
    history: list[dict], path: str | Path, stopped_epoch: int = -1, best_epoch: int = -1, title: str = ""
) -> Path:
    """Loss and accuracy per epoch, side by side; `title` says what was trained on what (a long one wraps)."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label=f"train {metric}")
        ax.plot(epochs, [row[f"valid_{metric}"] for row in history], "o-", label=f"valid {metric}")
        if best_epoch >= 1:
            ax.axvline(best_epoch, color="green", linestyle=":", label=f"best epoch ({best_epoch})")
        if stopped_epoch >= 1:
            ax.axvline(stopped_epoch, color="red", linestyle="--", label=f"early stop ({stopped_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 110))  # 110 characters: the 11-inch width
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
