"""Request items (proto `Input`) -> tensors ready to batch, and tensors -> proto `Tensor`.

Everything a client can get wrong about an item is caught here, with a message
that names the item (`inputs[3]: ...`), so that nothing malformed reaches the
model. Images go through the trainer's own `load_image`, so serving sees
exactly what training saw. Items stay uint8 when they can (images, UINT8
tensors): the float conversion is done once per batch, on the model's device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from bitmoji.core.preprocess import ImageError, load_image
from bitmoji.v1 import classifier_pb2 as pb

# Tensors are built straight on the request's immutable bytes, without a copy;
# they are only read (stacked into a new batch), so the warning does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

# Wire dtype -> little-endian numpy dtype.
_NUMPY_DTYPES = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
}
MAX_RANK = 8


class InputError(ValueError):
    """An item the server cannot use; the message names the item and the problem."""


@dataclass(frozen=True)
class InputSpec:
    """What the served model accepts."""

    shape: tuple[int, ...] | None  # one item, no batch dimension; None = undeclared (any shape)
    image_size: tuple[int, int] | None  # (height, width) images are resized to; None = no images
    max_pixels: int


def decode_input(item: pb.Input, index: int, spec: InputSpec) -> torch.Tensor:
    """One `Input` -> uint8 (images, UINT8 tensors) or float32 tensor of the item's shape."""
    kind = item.WhichOneof("kind")
    if kind == "image":
        if spec.image_size is None:
            raise InputError(
                f"inputs[{index}]: this model takes no images (its file declares no image preprocessing); send a raw tensor"
            )
        try:
            return load_image(item.image, size=spec.image_size, max_pixels=spec.max_pixels)
        except ImageError as exc:
            raise InputError(f"inputs[{index}]: {exc}") from None
    if kind == "tensor":
        return _decode_tensor(item.tensor, index, spec.shape)
    raise InputError(f"inputs[{index}]: empty input: set either image or tensor")


def _decode_tensor(tensor: pb.Tensor, index: int, expected: tuple[int, ...] | None) -> torch.Tensor:
    dtype = _NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        name = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else str(tensor.dtype)
        raise InputError(f"inputs[{index}]: unsupported tensor dtype {name}; use FLOAT32, FLOAT64, FLOAT16 or UINT8")
    shape = tuple(tensor.shape)
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
            f"{pb.DataType.Name(tensor.dtype)} needs {needed}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if dtype.kind == "u":
        return torch.from_numpy(array)
    if not np.isfinite(array).all():
        raise InputError(f"inputs[{index}]: tensor contains NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32, copy=False))


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    """Any tensor -> FLOAT32 little-endian proto `Tensor` (copied to CPU)."""
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes())
