"""What the client returns: small dataclasses built from the server's responses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bitmoji.client.convert import to_torch
from bitmoji.v1 import classifier_pb2 as pb


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one item."""

    label: str  # the predicted class name; empty for models without class names
    probability: float  # of the positive class: sigmoid(logit)
    logit: float
    model_version: str  # which model answered (it changes when the server hot-reloads)


@dataclass(frozen=True, eq=False)
class ParameterGradient:
    """The gradient of the loss w.r.t. one named parameter."""

    name: str
    shape: tuple[int, ...]
    norm: float
    max_abs: float
    mean_abs: float
    values: Any = None  # torch.Tensor in the parameter's shape, when asked for with values=True


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """One forward and backward pass on the server."""

    loss: float
    outputs: Any  # torch.Tensor [N, ...]: the model's outputs
    parameters: dict[str, ParameterGradient]  # in the model's named_parameters() order
    input_gradients: list  # one torch.Tensor per input, that input's shape: the saliency
    saliency_pngs: list[bytes | None]  # one per input: a PNG heat map, or None (not asked for, or not an image)
    model_version: str


@dataclass(frozen=True)
class ModelInfo:
    """What model the server runs, and how."""

    model_version: str
    architecture: str
    class_names: tuple[str, ...]
    positive_class: str
    input_shape: tuple[int, ...]
    metadata: dict = field(hash=False)  # everything the model file says about itself
    device: str = ""
    max_batch_size: int = 0
    max_batch_delay_ms: float = 0.0
    max_items_per_call: int = 0
    torch_threads: int = 0
    gradient_probe_enabled: bool = False
    model_sha256: str = ""


def predictions_from(response: pb.ClassifyResponse) -> list[Prediction]:
    return [Prediction(p.label, p.probability, p.logit, response.model_version) for p in response.predictions]


def _parameter_gradient(gradient: pb.ParameterGradient) -> ParameterGradient:
    values = to_torch(gradient.values) if gradient.HasField("values") else None
    return ParameterGradient(
        gradient.name, tuple(gradient.shape), gradient.norm, gradient.max_abs, gradient.mean_abs, values
    )


def probe_result_from(response: pb.GradientProbeResponse) -> ProbeResult:
    parameters = {p.name: _parameter_gradient(p) for p in response.parameters}
    return ProbeResult(
        loss=response.loss,
        outputs=to_torch(response.outputs),
        parameters=parameters,
        input_gradients=[to_torch(g.gradient) for g in response.input_gradients],
        saliency_pngs=[g.saliency_png or None for g in response.input_gradients],
        model_version=response.model_version,
    )


def model_info_from(response: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_version=response.model_version,
        architecture=response.architecture,
        class_names=tuple(response.class_names),
        positive_class=response.positive_class,
        input_shape=tuple(response.input_shape),
        metadata=json.loads(response.metadata_json) if response.metadata_json else {},
        device=response.device,
        max_batch_size=response.max_batch_size,
        max_batch_delay_ms=response.max_batch_delay_ms,
        max_items_per_call=response.max_items_per_call,
        torch_threads=response.torch_threads,
        gradient_probe_enabled=response.gradient_probe_enabled,
        model_sha256=response.model_sha256,
    )
