"""What the client returns: small dataclasses built from the server's responses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bitmoji.client import tensors
from bitmoji.v1 import classifier_pb2 as pb


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one item."""

    label: str  # the predicted class name; empty for models without class names
    probability: float  # of the positive class: sigmoid(logit)
    logit: float
    model_version: str  # which version answered ("1", "2", ...; a canary answers some calls)
    model_name: str = ""  # which model answered
    model_build: str = ""  # that version's file ("cnn-20261129T101500Z-3f2a9c1b7d4e"): changes on a reload in place


@dataclass(frozen=True, eq=False)
class ParameterGradient:
    """The gradient of the loss w.r.t. one named parameter."""

    name: str
    shape: tuple[int, ...]
    norm: float
    max_abs: float
    mean_abs: float
    values: Any = None  # the gradient in the parameter's shape (see ProbeResult), when asked for with values=True


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """One forward and backward pass on the server.

    Tensors are numpy arrays when numpy is installed, else nested lists in the
    tensor's shape, or torch tensors with `tensor_type="torch"`."""

    loss: float
    outputs: Any  # [N, ...]: the model's outputs
    parameters: dict[str, ParameterGradient]  # in the model's named_parameters() order
    input_gradients: list[Any]  # one per input, that input's shape: the saliency
    saliency_pngs: list[bytes | None]  # one per input: a PNG heat map, or None (not asked for, or not an image)
    model_version: str
    model_name: str = ""
    model_build: str = ""


@dataclass(frozen=True)
class ModelVersionStatus:
    """One version of a model in the server's repository."""

    version: str
    state: str  # "UNAVAILABLE", "LOADING", "READY", "UNLOADING" or "FAILED"
    reason: str = ""  # why it is FAILED or UNAVAILABLE
    build: str = ""  # the file's identity (READY versions)
    architecture: str = ""
    memory_bytes: int = 0  # resident memory its load added to the server (0: unknown)


@dataclass(frozen=True)
class ModelStatus:
    """A model's versions, and where calls that name no version go."""

    name: str
    versions: tuple[ModelVersionStatus, ...]  # ascending by version number
    default_version: str = ""  # "" when no version is READY
    default_pinned: bool = False  # set by a promote or roll back; else the highest READY version
    previous_default_version: str = ""  # what a roll back returns to
    canary_version: str = ""
    canary_weight: float = 0.0  # the share (0..1) of calls naming no version that go to the canary
    shadow_version: str = ""  # also runs the calls naming no version, off their path

    def version(self, version: str) -> ModelVersionStatus:
        """The status of one version; KeyError names the versions there are."""
        for status in self.versions:
            if status.version == version:
                return status
        known = ", ".join(v.version for v in self.versions) or "none"
        raise KeyError(f"model {self.name!r} has no version {version!r} (versions: {known})")


@dataclass(frozen=True)
class ModelList:
    """Every model in the server's repository; iterate it, or index it by name."""

    models: tuple[ModelStatus, ...]
    default_model: str = ""  # the model calls that name none get

    def __iter__(self) -> Iterator[ModelStatus]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, name: str) -> ModelStatus:
        for model in self.models:
            if model.name == name:
                return model
        known = ", ".join(m.name for m in self.models) or "none"
        raise KeyError(f"no model named {name!r} (models: {known})")


@dataclass(frozen=True)
class ModelInfo:
    """What model the server runs, and how."""

    model_version: str
    architecture: str
    class_names: tuple[str, ...]
    positive_class: str
    input_shape: tuple[int, ...]
    metadata: dict[str, Any] = field(hash=False)  # everything the model file says about itself
    device: str = ""
    max_batch_size: int = 0
    max_batch_delay_ms: float = 0.0
    max_items_per_call: int = 0
    torch_threads: int = 0
    gradient_probe_enabled: bool = False
    model_sha256: str = ""
    model_name: str = ""
    model_build: str = ""
    status: ModelStatus | None = None  # every version of the model, and where calls go (None: an older server)


def predictions_from(response: pb.ClassifyResponse) -> list[Prediction]:
    return [
        Prediction(p.label, p.probability, p.logit, response.model_version, response.model_name, response.model_build)
        for p in response.predictions
    ]


def _parameter_gradient(gradient: pb.ParameterGradient, tensor_type: str) -> ParameterGradient:
    values = tensors.decode(gradient.values, tensor_type) if gradient.HasField("values") else None
    return ParameterGradient(
        gradient.name, tuple(gradient.shape), gradient.norm, gradient.max_abs, gradient.mean_abs, values
    )


def probe_result_from(response: pb.GradientProbeResponse, tensor_type: str = "auto") -> ProbeResult:
    return ProbeResult(
        loss=response.loss,
        outputs=tensors.decode(response.outputs, tensor_type),
        parameters={p.name: _parameter_gradient(p, tensor_type) for p in response.parameters},
        input_gradients=[tensors.decode(g.gradient, tensor_type) for g in response.input_gradients],
        saliency_pngs=[g.saliency_png or None for g in response.input_gradients],
        model_version=response.model_version,
        model_name=response.model_name,
        model_build=response.model_build,
    )


def state_name(state: int) -> str:
    """`MODEL_STATE_READY` -> "READY"; a state newer than these stubs -> "STATE_7"."""
    try:
        return str(pb.ModelState.Name(state)).removeprefix("MODEL_STATE_")
    except ValueError:
        return f"STATE_{state}"


def model_status_from(status: pb.ModelStatus) -> ModelStatus:
    return ModelStatus(
        name=status.name,
        versions=tuple(
            ModelVersionStatus(
                version=v.version,
                state=state_name(v.state),
                reason=v.reason,
                build=v.build,
                architecture=v.architecture,
                memory_bytes=v.memory_bytes,
            )
            for v in status.versions
        ),
        default_version=status.default_version,
        default_pinned=status.default_pinned,
        previous_default_version=status.previous_default_version,
        canary_version=status.canary_version,
        canary_weight=status.canary_weight,
        shadow_version=status.shadow_version,
    )


def model_list_from(response: pb.ListModelsResponse) -> ModelList:
    return ModelList(tuple(model_status_from(m) for m in response.models), response.default_model)


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
        model_name=response.model_name,
        model_build=response.model_build,
        status=model_status_from(response.status) if response.HasField("status") else None,
    )
