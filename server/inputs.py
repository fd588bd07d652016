"""Request items -> tensors ready to batch, whatever protocol they came by.

An item is what one input of a call carries: encoded image bytes, or a
`RawTensor` (dtype name, shape, little-endian bytes). The servicers turn their
protocol's messages into items; everything a client can get wrong about an
item's content is caught here, with a message that names the item
(`inputs[3]: ...`), so nothing malformed reaches the model. Images go through
`bitmoji.core.preprocess.load_image`, so serving sees exactly what training
saw. Items stay uint8 when they can (images, uint8 tensors): the float
conversion is done once per batch, on the model's device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from bitmoji.core.preprocess import ImageError, load_image
from bitmoji.server.errors import InvalidArgument

# Tensors are built straight on the request's immutable bytes, without a copy;
# they are only read (stacked into a new batch), so the warning does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

# dtype name -> little-endian numpy dtype
NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
}
MAX_RANK = 8


class InputError(InvalidArgument):
    """An item the server cannot use; the message names the item and the problem."""


@dataclass(frozen=True, slots=True)
class RawTensor:
    """A preprocessed item: `data` holds prod(shape) elements of `dtype` (a NUMPY_DTYPES name), row-major."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


Item = bytes | RawTensor


@dataclass(frozen=True)
class InputSpec:
    """What the served model accepts."""

    shape: tuple[int, ...] | None  # one item, no batch dimension; None = undeclared (any shape)
    image_size: tuple[int, int] | None  # (height, width) images are resized to; None = no images
    max_pixels: int


def decode_input(item: Item, index: int, spec: InputSpec) -> torch.Tensor:
    """One item -> uint8 (images, uint8 tensors) or float32 tensor of the item's shape."""
    if isinstance(item, RawTensor):
        return _decode_tensor(item, index, spec.shape)
    if spec.image_size is None:
        raise InputError(
            f"inputs[{index}]: this model takes no images (its file declares no image preprocessing); send a raw tensor"
        )
    try:
        return load_image(item, size=spec.image_size, max_pixels=spec.max_pixels)
    except ImageError as exc:
        raise InputError(f"inputs[{index}]: {exc}") from None


def _decode_tensor(tensor: RawTensor, index: int, expected: tuple[int, ...] | None) -> torch.Tensor:
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InputError(
            f"inputs[{index}]: unsupported tensor dtype {tensor.dtype}; "
            f"use {', '.join(n.upper() for n in NUMPY_DTYPES)}"
        )
    shape = tensor.shape
    if len(shape) > MAX_RANK or any(d < 1 for d in shape):
        raise InputError(
            f"inputs[{index}]: bad tensor shape {list(shape)}: dimensions must be positive, at most {MAX_RANK} of them"
        )
    if expected is not None and shape != expected:
        raise InputError(
            f"inputs[{index}]: tensor shape {list(shape)} does not match the model's input shape {list(expected)}"
        )
    needed = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != needed:
        raise InputError(
            f"inputs[{index}]: tensor data has {len(tensor.data)} bytes; shape {list(shape)} of "
            f"{tensor.dtype.upper()} needs {needed}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if dtype.kind == "u":
        return torch.from_numpy(array)
    if not np.isfinite(array).all():
        raise InputError(f"inputs[{index}]: tensor contains NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32, copy=False))
