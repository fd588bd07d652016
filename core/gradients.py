"""Forward, loss, backward: the gradients of the loss w.r.t. every parameter and the input.

This is the lecture's backpropagation walk-through as a utility; the server's
GradientProbe calls it. It uses `torch.autograd.grad`, which returns the
gradients instead of accumulating them into `.grad`, and never switches the
module to train mode, so probes running beside each other and beside
inference cannot corrupt one another.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "bce": F.binary_cross_entropy_with_logits,  # classifiers: outputs are logits, targets in [0, 1]
    "mse": F.mse_loss,  # regression, e.g. the lecture's toy network
}


class ProbeError(ValueError):
    """Inputs, targets or loss that a probe cannot use; the message says which."""


STATS_CHUNK = 1 << 20  # elements per chunk (4 MB of float32): stays in cache, and few ops per big gradient
DOT_ROW = 4096  # squares are summed as dot products of this length: one float32 dot over 1 M values drifts by 2e-5
SMALL_GRADIENT = 1 << 16  # up to this size, one float64 pass in numpy: a few microseconds instead of ten torch ops


def gradient_stats(gradient: torch.Tensor) -> tuple[float, float, float]:
    """(L2 norm, max |g|, mean |g|) of a gradient, to about 1e-8 relative, without a temporary of its size.

    The MLP's first weight gradient is 25 MB and the probe's biggest cost
    after the backward pass itself. `g.abs().max()` and `g.abs().mean()`
    allocated two 25 MB copies per probe; one float32 `vector_norm` was off by
    2e-4 relative. Here each 1 M-value chunk's |g| goes into one reused buffer
    that stays in cache; its sum and max are taken there, and its sum of
    squares as a batch of 4096-long dot products (one `bmm`), so every float32
    accumulation stays short. The chunks' results come back in one transfer
    and add up in Python floats. Small gradients (biases, the narrow layers)
    take one float64 numpy pass: a dozen torch calls each cost more than the
    arithmetic.
    """
    n = gradient.numel()
    if n == 0:
        return 0.0, 0.0, 0.0
    flat = gradient.detach().reshape(-1)
    if n <= SMALL_GRADIENT:
        magnitude = np.abs(flat.to("cpu", torch.float64).numpy())
        return math.sqrt(float(magnitude @ magnitude)), float(magnitude.max()), float(magnitude.sum()) / n
    buffer = torch.empty(min(STATS_CHUNK, n), dtype=flat.dtype, device=flat.device)
    parts = []
    for chunk in flat.split(STATS_CHUNK):
        magnitude = torch.abs(chunk, out=buffer[: chunk.numel()])
        parts.append(torch.stack((magnitude.sum(), _square_sum(magnitude), magnitude.max())))
    sums, squares, maxima = torch.stack(parts).to("cpu", torch.float64).T.tolist()
    return math.sqrt(math.fsum(squares)), max(maxima), math.fsum(sums) / n


def _square_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a 1-D tensor: rows of DOT_ROW values dotted with themselves in one bmm, plus the tail."""
    rows = values.numel() // DOT_ROW
    body = values[: rows * DOT_ROW].view(rows, 1, DOT_ROW)
    tail = values[rows * DOT_ROW :]
    return torch.bmm(body, body.transpose(1, 2)).sum() + torch.dot(tail, tail)


@dataclass
class ParameterGradient:
    name: str
    gradient: torch.Tensor  # same shape as the parameter

    @cached_property
    def _stats(self) -> tuple[float, float, float]:
        return gradient_stats(self.gradient)

    @property
    def norm(self) -> float:
        return self._stats[0]

    @property
    def max_abs(self) -> float:
        return self._stats[1]

    @property
    def mean_abs(self) -> float:
        return self._stats[2]


@dataclass
class ProbeResult:
    loss: float
    outputs: torch.Tensor  # the model's outputs, detached
    parameters: list[ParameterGradient]  # in `named_parameters()` order
    input_gradient: torch.Tensor  # d loss / d input, the input's shape


class NotDifferentiable(ProbeError):
    """The model itself cannot be probed (no autograd through it), whatever the request."""


def gradient_probe(
    module: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss: str = "bce"
) -> ProbeResult:
    """One forward and backward pass; `targets` has one value per output element (mean-reduced loss)."""
    if loss not in LOSSES:
        raise ProbeError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        outputs = module(x)
        if not outputs.requires_grad:
            raise NotDifferentiable(
                "the model's output does not depend differentiably on its input or parameters "
                "(a quantized or frozen module?): GradientProbe needs a float model with parameters"
            )
        if targets.numel() != outputs.numel():
            raise ProbeError(
                f"got {targets.numel()} targets for {outputs.numel()} outputs (one target per output value)"
            )
        targets = targets.to(dtype=outputs.dtype, device=outputs.device).reshape(outputs.shape)
        if not torch.isfinite(targets).all():
            raise ProbeError("targets must be finite")
        if loss == "bce" and ((targets < 0) | (targets > 1)).any():
            raise ProbeError("bce targets must lie in [0, 1] (1 = the positive class)")
        value = LOSSES[loss](outputs, targets)
        grads = torch.autograd.grad(value, [x] + [p for _, p in named], allow_unused=True)
    parameters = [
        ParameterGradient(name, torch.zeros_like(p) if g is None else g.detach())
        for (name, p), g in zip(named, grads[1:], strict=True)
    ]
    input_gradient = torch.zeros_like(x) if grads[0] is None else grads[0].detach()
    return ProbeResult(float(value.detach()), outputs.detach(), parameters, input_gradient)
