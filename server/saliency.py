"""A gradient w.r.t. an image -> a PNG a person can read: the input and its saliency map side by side, with a scale.

Plain numpy + Pillow: importing matplotlib for one colormap would cost the
server a second of start-up. The colormap is a piecewise-linear approximation
of matplotlib's "inferno" (dark = no influence, bright yellow = most).

Layout (for a 128x128 input, SCALE 3): a title line; the input, enlarged; the
saliency over a dimmed copy of the input; a colour bar from 0 to the largest
|gradient|, labelled with its value.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# (position, RGB) anchors of "inferno".
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32) / 255.0

SCALE = 3  # each input pixel becomes SCALE x SCALE pixels (nearest neighbour: the pixels stay visible)
MARGIN = 12
TITLE = 22
BAR_WIDTH = 18
LABELS = 70  # room for the colour bar's labels
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape -> RGB float in [0, 1], shape + (3,)."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    rgb = np.stack([np.interp(flat, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.reshape(*values.shape, 3)


def figure_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of the PNG for an input of height x width pixels."""
    return (
        MARGIN + width * SCALE + MARGIN + width * SCALE + MARGIN + BAR_WIDTH + LABELS,
        TITLE + height * SCALE + MARGIN,
    )


def _rgb(array: np.ndarray) -> Image.Image:
    """HWC floats in [0, 1] -> an enlarged RGB image."""
    image = Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8), "RGB")
    return image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.NEAREST)


def saliency_png(image: torch.Tensor, gradient: torch.Tensor, *, strength: float = 0.8) -> bytes:
    """`image` [C, H, W] in [0, 1] (C = 1 or 3) and d loss / d image of the same shape -> PNG bytes.

    Saliency is |gradient| (max over channels), scaled so the strongest pixel
    is 1; it is blended over a dimmed copy of the image with opacity
    proportional to it, so the image shows through where the model does not look.
    """
    heat = gradient.detach().abs().amax(dim=0).to("cpu", torch.float32).numpy()
    peak = float(heat.max()) if heat.size else 0.0
    scaled = heat / peak if peak > 0 and np.isfinite(peak) else np.zeros_like(heat)
    base = image.detach().to("cpu", torch.float32).clamp(0, 1).numpy()
    base = (np.repeat(base, 3, axis=0) if base.shape[0] == 1 else base[:3]).transpose(1, 2, 0)  # HWC
    alpha = (strength * scaled)[..., None]
    overlay = (1 - alpha) * (0.35 * base) + alpha * colormap(scaled)
    height, width = heat.shape

    figure = Image.new("RGB", figure_size(height, width), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    left, right = MARGIN, MARGIN + width * SCALE + MARGIN
    figure.paste(_rgb(base), (left, TITLE))
    figure.paste(_rgb(overlay), (right, TITLE))
    draw.text((left, 5), "input", fill=INK, font=font)
    draw.text((right, 5), "saliency: |d loss / d pixel|, max over channels", fill=INK, font=font)
    # the colour bar: top = the largest |gradient|, bottom = 0
    bar_left, bar_height = right + width * SCALE + MARGIN, height * SCALE
    ramp = colormap(np.linspace(1.0, 0.0, bar_height))[:, None, :].repeat(BAR_WIDTH, axis=1)
    figure.paste(Image.fromarray(np.round(ramp * 255).astype(np.uint8), "RGB"), (bar_left, TITLE))
    draw.rectangle((bar_left, TITLE, bar_left + BAR_WIDTH - 1, TITLE + bar_height - 1), outline=INK)
    labels_x = bar_left + BAR_WIDTH + 4
    draw.text((labels_x, TITLE), f"{peak:.2g}", fill=INK, font=font)
    draw.text((labels_x, TITLE + bar_height // 2 - 5), f"{peak / 2:.2g}", fill=INK, font=font)
    draw.text((labels_x, TITLE + bar_height - 11), "0", fill=INK, font=font)
    out = io.BytesIO()
    figure.save(out, format="PNG")
    return out.getvalue()
