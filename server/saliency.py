"""A gradient w.r.t. an image -> a PNG heat map over that image (the "saliency map" a person looks at).

Plain numpy + Pillow: importing matplotlib for one colormap would cost the
server a second of start-up. The colormap is a piecewise-linear approximation
of matplotlib's "inferno" (dark = no influence, bright yellow = most).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# (position, RGB) anchors of "inferno".
_ANCHORS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32) / 255.0


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape -> RGB float in [0, 1], shape + (3,)."""
    flat = np.clip(values, 0.0, 1.0).ravel()
    rgb = np.stack([np.interp(flat, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.reshape(*values.shape, 3)


def saliency_png(image: torch.Tensor, gradient: torch.Tensor, *, strength: float = 0.7) -> bytes:
    """`image` [C, H, W] in [0, 1] (C = 1 or 3) and d loss / d image of the same shape -> PNG bytes.

    Saliency is |gradient| (max over channels), scaled so the strongest pixel is 1;
    it is blended over the image with opacity proportional to it, so the image
    shows through where the model does not look.
    """
    heat = gradient.detach().abs().amax(dim=0).to("cpu", torch.float32).numpy()
    peak = float(heat.max()) if heat.size else 0.0
    heat = heat / peak if peak > 0 and np.isfinite(peak) else np.zeros_like(heat)
    base = image.detach().to("cpu", torch.float32).clamp(0, 1).numpy()
    base = np.repeat(base, 3, axis=0) if base.shape[0] == 1 else base[:3]
    base = base.transpose(1, 2, 0)  # HWC
    alpha = (strength * heat)[..., None]
    blended = (1 - alpha) * base + alpha * colormap(heat)
    out = io.BytesIO()
    Image.fromarray(np.round(blended * 255).astype(np.uint8), "RGB").save(out, format="PNG")
    return out.getvalue()
