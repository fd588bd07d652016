"""The server's raw tensors (`Tensor` messages) as Python values: numpy arrays, nested lists or torch tensors.

The client installs without numpy and torch, so neither may be needed to read
a result: `"auto"` gives numpy arrays when numpy is installed, else nested
lists of numbers in the tensor's shape (a 0-d tensor is a bare number);
`"numpy"`, `"list"` and `"torch"` ask for one kind. Asking for a library that
is not installed fails before anything is sent.
"""

from __future__ import annotations

import importlib.util
import math
import struct
import sys
from collections.abc import Sequence
from typing import Any, Literal, get_args

from bitmoji.v1 import classifier_pb2 as pb

TensorType = Literal["auto", "numpy", "list", "torch"]
TENSOR_TYPES: tuple[str, ...] = get_args(TensorType)
# wire dtype -> (numpy's and torch's name, struct format character, bytes per element)
_LAYOUTS: dict[int, tuple[str, str, int]] = {
    pb.DATA_TYPE_FLOAT32: ("float32", "f", 4),
    pb.DATA_TYPE_FLOAT64: ("float64", "d", 8),
    pb.DATA_TYPE_FLOAT16: ("float16", "e", 2),
    pb.DATA_TYPE_UINT8: ("uint8", "B", 1),
}


def installed(module: str) -> bool:
    """Importable, without importing it (find_spec reads the file system only)."""
    return module in sys.modules or importlib.util.find_spec(module) is not None


def resolve(tensor_type: str) -> str:
    """`"auto"` -> `"numpy"` or `"list"`; refuses an unknown type or a library that is not installed."""
    if tensor_type not in TENSOR_TYPES:
        raise ValueError(f"tensor_type must be one of {', '.join(TENSOR_TYPES)}; got {tensor_type!r}")
    if tensor_type == "auto":
        return "numpy" if installed("numpy") else "list"
    if tensor_type in ("numpy", "torch") and not installed(tensor_type):
        raise ImportError(
            f"tensor_type={tensor_type!r} needs {tensor_type}, which is not installed: "
            f"pip install {tensor_type}, or use tensor_type='list'"
        )
    return tensor_type


def _layout(tensor: pb.Tensor) -> tuple[str, str, tuple[int, ...], int]:
    """(dtype name, struct character, shape, element count), after checking the dtype and the byte count."""
    if tensor.dtype not in _LAYOUTS:
        raise ValueError(f"unsupported tensor dtype {pb.DataType.Name(tensor.dtype)}")
    name, code, size = _LAYOUTS[tensor.dtype]
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"bad tensor shape {list(shape)}")
    count = math.prod(shape)
    if len(tensor.data) != count * size:
        raise ValueError(
            f"tensor of shape {list(shape)} and dtype {name} needs {count * size} bytes, got {len(tensor.data)}"
        )
    return name, code, shape, count


def _nest(flat: Sequence[float], shape: Sequence[int]) -> Any:
    """A flat row-major sequence as nested lists of `shape` (a bare number for shape ())."""
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return list(flat)
    step = math.prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def decode(tensor: pb.Tensor, tensor_type: str = "auto") -> Any:
    """`Tensor` -> a numpy array, nested lists or a torch tensor of its shape; it owns its memory."""
    kind = resolve(tensor_type)
    name, code, shape, count = _layout(tensor)
    if kind == "list":
        return _nest(struct.unpack(f"<{count}{code}", tensor.data), shape)
    if kind == "numpy":
        import numpy as np

        if count == 0:
            return np.zeros(shape, dtype=name)
        return np.frombuffer(tensor.data, dtype=np.dtype(name).newbyteorder("<")).astype(name).reshape(shape)
    import torch

    dtype = getattr(torch, name)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(tensor.data), dtype=dtype).reshape(shape)  # little-endian hosts only, as torch


def to_torch(tensor: pb.Tensor) -> Any:
    """`Tensor` -> a torch tensor (torch must be installed)."""
    return decode(tensor, "torch")


def flat(values: Any) -> list[float]:
    """Every number of a decoded tensor (array, tensor, nested lists or a bare number), row-major."""
    if hasattr(values, "reshape"):
        return list(values.reshape(-1).tolist())
    if isinstance(values, list):
        return [number for value in values for number in flat(value)]
    return [values]
