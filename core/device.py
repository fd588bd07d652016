"""`--device auto|cpu|cuda|cuda:N` -> a torch device, one rule for training and serving."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device this machine does not have; the message says which."""


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a device name (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine")
    return device
