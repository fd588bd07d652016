"""Python values to the wire: `Input` and `Tensor` messages, and the requests made of them.

An item is one of: a file path (str or os.PathLike, read here: the server
never opens files), encoded image bytes, a PIL image (sent as PNG, lossless),
a numpy array or a torch tensor (sent as a raw, already preprocessed tensor:
for the image models float [3, 128, 128] in [0, 1] or uint8 [3, 128, 128]),
or an `Input` proto. A 4-D array or tensor is a batch: one item per entry of
its first dimension. torch and numpy are only touched when the caller passes
their objects, so classifying files does not pay for importing torch (and
the client installs without either). Tensors coming back are `tensors.py`'s job.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

from bitmoji.v1 import classifier_pb2 as pb

# dtype name (numpy's and torch's spelling agree) -> wire type
_DTYPES: dict[str, pb.DataType] = {
    "float32": pb.DATA_TYPE_FLOAT32,
    "float64": pb.DATA_TYPE_FLOAT64,
    "float16": pb.DATA_TYPE_FLOAT16,
    "uint8": pb.DATA_TYPE_UINT8,
}
LOSSES: dict[str, pb.Loss] = {"bce": pb.LOSS_BCE, "mse": pb.LOSS_MSE}


# An object of a library's type can only exist once the library is imported: look, don't import.
def _numpy_array_type() -> Any:  # a type to pass to isinstance, or () when numpy is not loaded
    numpy = sys.modules.get("numpy")
    return numpy.ndarray if numpy else ()


def _torch_tensor_type() -> Any:  # the same for torch
    torch = sys.modules.get("torch")
    return torch.Tensor if torch else ()


def _is_pil_image(item: Any) -> bool:
    image = sys.modules.get("PIL.Image")
    return image is not None and isinstance(item, image.Image)


def _is_single_item(item: Any) -> bool:
    return isinstance(
        item,
        (
            str,
            os.PathLike,
            bytes,
            bytearray,
            memoryview,
            pb.Input,
            pb.Tensor,
            _numpy_array_type(),
            _torch_tensor_type(),
        ),
    ) or _is_pil_image(item)


def _wire_dtype(name: str) -> pb.DataType:
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def tensor_proto(array: Any) -> pb.Tensor:
    """A numpy array or torch tensor -> `Tensor` (row-major, little-endian)."""
    import numpy as np

    if isinstance(array, _torch_tensor_type()):
        _wire_dtype(str(array.dtype).removeprefix("torch."))  # before .numpy(), which refuses bfloat16 less clearly
        array = array.detach().cpu().numpy()
    dtype = _wire_dtype(array.dtype.name)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=data)


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _inputs_of(item: Any) -> list[pb.Input]:
    """One item, or several for a 4-D array or tensor."""
    if isinstance(item, pb.Input):
        return [item]
    if isinstance(item, pb.Tensor):
        return [pb.Input(tensor=item)]
    if isinstance(item, (bytes, bytearray, memoryview)):
        return [pb.Input(image=bytes(item))]
    if isinstance(item, (str, os.PathLike)):
        with open(item, "rb") as f:
            return [pb.Input(image=f.read())]
    if _is_pil_image(item):
        return [pb.Input(image=_png_bytes(item))]
    if isinstance(item, (_numpy_array_type(), _torch_tensor_type())):
        if item.ndim == 4:
            return [pb.Input(tensor=tensor_proto(one)) for one in item]
        return [pb.Input(tensor=tensor_proto(item))]
    raise TypeError(
        f"unsupported item type {type(item).__name__}: expected a file path, image bytes, "
        "a PIL image, a numpy array or a torch tensor"
    )


def to_inputs(items: Any) -> list[pb.Input]:
    """One item or an iterable of items -> `Input` messages, in order."""
    if _is_single_item(items):
        return _inputs_of(items)
    if not isinstance(items, Iterable):
        return _inputs_of(items)  # raises the TypeError that names the type
    inputs: list[pb.Input] = []
    for index, item in enumerate(items):
        try:
            inputs.extend(_inputs_of(item))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"item {index}: {exc}") from None
    return inputs


def to_targets(targets: Any) -> list[float]:
    """A number, a sequence of numbers, a numpy array or a torch tensor -> flat floats."""
    if isinstance(targets, (int, float)):
        return [float(targets)]
    if isinstance(targets, (_numpy_array_type(), _torch_tensor_type())):
        return [float(value) for value in targets.reshape(-1).tolist()]
    return [float(value) for value in targets]


def classify_request(items: Any, model: str = "", version: str = "") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(inputs=to_inputs(items), model_name=model, model_version=version)


def stream_requests(
    batches: Iterable[Any], failure: list[Exception], model: str = "", version: str = ""
) -> Iterator[pb.ClassifyRequest]:
    """Requests for a stream, made lazily. gRPC reads this iterator in its own thread and
    would swallow our errors: the first one is put in `failure` and ends the stream."""
    try:
        for items in batches:
            yield classify_request(items, model, version)
    except Exception as exc:
        failure.append(exc)


async def astream_requests(
    batches: Iterable[Any] | AsyncIterable[Any], failure: list[Exception], model: str = "", version: str = ""
) -> AsyncIterator[pb.ClassifyRequest]:
    """`stream_requests` for grpc.aio, from a plain or an async iterable."""
    try:
        if isinstance(batches, AsyncIterable):
            async for items in batches:
                yield classify_request(items, model, version)
        else:
            for items in batches:
                yield classify_request(items, model, version)
    except Exception as exc:
        failure.append(exc)


def probe_request(
    inputs: Any, targets: Any, loss: str, values: bool, saliency: bool, model: str = "", version: str = ""
) -> pb.GradientProbeRequest:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    request = pb.GradientProbeRequest(
        inputs=to_inputs(inputs),
        targets=to_targets(targets),
        loss=LOSSES[loss],
        include_values=values,
        include_saliency_png=saliency,
        model_name=model,
        model_version=version,
    )
    if not request.inputs:
        raise ValueError("gradient_probe needs at least one input")
    return request
