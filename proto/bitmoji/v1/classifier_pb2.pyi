from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]

class Loss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_UNSPECIFIED: _ClassVar[Loss]
    LOSS_BCE: _ClassVar[Loss]
    LOSS_MSE: _ClassVar[Loss]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_UNAVAILABLE: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_UINT8: DataType
LOSS_UNSPECIFIED: Loss
LOSS_BCE: Loss
LOSS_MSE: Loss
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_UNAVAILABLE: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_UNLOADING: ModelState
MODEL_STATE_FAILED: ModelState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("image", "tensor")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    tensor: Tensor
    def __init__(self, image: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("inputs", "model_name", "model_version")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    model_name: str
    model_version: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "probability", "logit")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    logit: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions", "model_version", "model_name", "model_build")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_BUILD_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_version: str
    model_name: str
    model_build: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_version: _Optional[str] = ..., model_name: _Optional[str] = ..., model_build: _Optional[str] = ...) -> None: ...

class GradientProbeRequest(_message.Message):
    __slots__ = ("inputs", "targets", "loss", "include_values", "include_saliency_png", "model_name", "model_version")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VALUES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SALIENCY_PNG_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    targets: _containers.RepeatedScalarFieldContainer[float]
    loss: Loss
    include_values: bool
    include_saliency_png: bool
    model_name: str
    model_version: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., targets: _Optional[_Iterable[float]] = ..., loss: _Optional[_Union[Loss, str]] = ..., include_values: _Optional[bool] = ..., include_saliency_png: _Optional[bool] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ParameterGradient(_message.Message):
    __slots__ = ("name", "shape", "norm", "max_abs", "mean_abs", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    norm: float
    max_abs: float
    mean_abs: float
    values: Tensor
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., norm: _Optional[float] = ..., max_abs: _Optional[float] = ..., mean_abs: _Optional[float] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InputGradient(_message.Message):
    __slots__ = ("gradient", "saliency_png")
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_PNG_FIELD_NUMBER: _ClassVar[int]
    gradient: Tensor
    saliency_png: bytes
    def __init__(self, gradient: _Optional[_Union[Tensor, _Mapping]] = ..., saliency_png: _Optional[bytes] = ...) -> None: ...

class GradientProbeResponse(_message.Message):
    __slots__ = ("loss", "outputs", "parameters", "input_gradients", "model_version", "model_name", "model_build")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_BUILD_FIELD_NUMBER: _ClassVar[int]
    loss: float
    outputs: Tensor
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterGradient]
    input_gradients: _containers.RepeatedCompositeFieldContainer[InputGradient]
    model_version: str
    model_name: str
    model_build: str
    def __init__(self, loss: _Optional[float] = ..., outputs: _Optional[_Union[Tensor, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[ParameterGradient, _Mapping]]] = ..., input_gradients: _Optional[_Iterable[_Union[InputGradient, _Mapping]]] = ..., model_version: _Optional[str] = ..., model_name: _Optional[str] = ..., model_build: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_version", "architecture", "class_names", "positive_class", "input_shape", "metadata_json", "device", "max_batch_size", "max_batch_delay_ms", "max_items_per_call", "torch_threads", "gradient_probe_enabled", "model_sha256", "model_name", "model_build", "status")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_CLASS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_PROBE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_BUILD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    architecture: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    positive_class: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    metadata_json: str
    device: str
    max_batch_size: int
    max_batch_delay_ms: float
    max_items_per_call: int
    torch_threads: int
    gradient_probe_enabled: bool
    model_sha256: str
    model_name: str
    model_build: str
    status: ModelStatus
    def __init__(self, model_version: _Optional[str] = ..., architecture: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., positive_class: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., metadata_json: _Optional[str] = ..., device: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., max_items_per_call: _Optional[int] = ..., torch_threads: _Optional[int] = ..., gradient_probe_enabled: _Optional[bool] = ..., model_sha256: _Optional[str] = ..., model_name: _Optional[str] = ..., model_build: _Optional[str] = ..., status: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason", "build", "architecture", "memory_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: ModelState
    reason: str
    build: str
    architecture: str
    memory_bytes: int
    def __init__(self, version: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., build: _Optional[str] = ..., architecture: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "versions", "default_version", "default_pinned", "previous_default_version", "canary_version", "canary_weight", "shadow_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PINNED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    default_version: str
    default_pinned: bool
    previous_default_version: str
    canary_version: str
    canary_weight: float
    shadow_version: str
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ..., default_version: _Optional[str] = ..., default_pinned: _Optional[bool] = ..., previous_default_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_weight: _Optional[float] = ..., shadow_version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("ready_only",)
    READY_ONLY_FIELD_NUMBER: _ClassVar[int]
    ready_only: bool
    def __init__(self, ready_only: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_name", "versions")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_name", "versions")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_name: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class SetDefaultVersionRequest(_message.Message):
    __slots__ = ("model_name", "version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SetDefaultVersionResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class SetTrafficRequest(_message.Message):
    __slots__ = ("model_name", "canary_version", "canary_weight", "shadow_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    canary_version: str
    canary_weight: float
    shadow_version: str
    def __init__(self, model_name: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_weight: _Optional[float] = ..., shadow_version: _Optional[str] = ...) -> None: ...

class SetTrafficResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...
