"""The Open Inference Protocol (KServe V2) over gRPC: `inference.GRPCInferenceService`, beside `bitmoji.v1.Classifier`.

Generic V2 clients (tritonclient, KServe, Triton's perf_analyzer, grpcurl)
need nothing but ModelMetadata to call the model, named `bitmoji` unless
`--model-name` says otherwise, whose version is the served model's:

    inputs   image          FP32   [-1, 3, 128, 128]  preprocessed: RGB, resized, scaled to [0, 1]
                                                        (`bitmoji.core.preprocess`; the item shape is the model's)
             image_bytes    BYTES  [-1]               encoded images (PNG, JPEG, ...), preprocessed by the
                                                        server exactly like Classify's `image` inputs
    outputs  logits         FP32   [-1, 1]            the model's raw output
             probabilities  FP32   [-1, 1]            sigmoid(logit): the positive class's probability
             labels         BYTES  [-1, 1]            the predicted class name (models with class names only)

A request sends exactly one of the inputs (a model without image
preprocessing takes one FP32 input named `input`). ModelInfer takes the same
path as Classify (`Engine.infer`: admission, routing, then the version's
dynamic batcher, whose model threads decode), so calls of both protocols batch
together, obey the same limits and give the same numbers. Outputs come back in `raw_output_contents`
(what tritonclient reads), in the order asked for; all of them when none is
asked for. Readiness is the health service's: ServerReady and ModelReady say
true exactly while `grpc.health.v1` says SERVING.

Models are the repository's (`--model FILE` is model `--model-name`, version
1): ModelMetadata lists a model's READY versions, a request that names no
version gets the default one (or its canary), and the repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) is Triton's, so
tritonclient's `get_model_repository_index`, `load_model` and `unload_model`
work unchanged (load and unload need --model-control-mode explicit, as in
Triton, and the management token when tokens are on).

Errors are gRPC statuses with a message: INVALID_ARGUMENT for a wrong input
or output name, datatype, shape or size; NOT_FOUND for an unknown model or
version; the rest as Classify's (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...).
Every RPC is counted in the request metrics under its own name.

tritonclient ships its own copy of the `inference.*` protobuf messages, so it
and this module cannot be imported into one Python process (protobuf refuses
the duplicate symbols); `bitmoji.server.main` imports this module only when it serves.
"""

from __future__ import annotations

import importlib.metadata

from bitmoji.inference import grpc_service_pb2 as kpb
from bitmoji.inference import grpc_service_pb2_grpc as kpb_grpc
from bitmoji.server.classifier import deadline_of
from bitmoji.server.engine import Engine
from bitmoji.server.inputs import InputError
from bitmoji.server.kserve_codec import (
    decode_request,
    encode_outputs,
    input_tensors,
    invalid,
    output_tensors,
    relabel,
    requested_outputs,
)
from bitmoji.server.model import ServedModel
from bitmoji.server.models import State

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "bitmoji-serve"
PLATFORM = "pytorch_torchscript"
EXTENSION_REPOSITORY = "model_repository"


def _server_version() -> str:
    try:
        return importlib.metadata.version("bitmoji-serving")
    except importlib.metadata.PackageNotFoundError:
        return "0"


# -- the servicer -----------------------------------------------------------------


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over the engine's models."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._models = engine.manager
        self._version = _server_version()

    def _model(self, name: str, version: str) -> tuple[ServedModel, str]:
        """The model version a request names (the default one when it names none): (model, version label)."""
        if not name:
            raise invalid("model_name is required")
        loaded = self._models.loaded(name, version)
        return loaded.served, loaded.label

    async def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=True)  # answering at all is being live

    async def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=self._engine.is_ready())

    async def ModelReady(self, request, context):
        self._models.entry(request.name)  # NOT_FOUND for a model the repository does not have
        return kpb.ModelReadyResponse(ready=self._engine.is_ready(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=[EXTENSION_REPOSITORY])

    async def ModelMetadata(self, request, context):
        model, _ = self._model(request.name, request.version)
        status = self._models.status(request.name)
        TensorMetadata = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=request.name,
            versions=[str(v.version) for v in status.versions if v.state is State.READY],
            platform=PLATFORM,
            inputs=[TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in input_tensors(model)],
            outputs=[TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in output_tensors(model)],
        )

    async def ModelInfer(self, request, context):
        model, _ = self._model(request.model_name, request.model_version)  # the signature to check against
        outputs = requested_outputs(request, model)
        items = await decode_request(request, model)
        try:
            result = await self._engine.infer(
                items, model=request.model_name, version=request.model_version, deadline=deadline_of(context)
            )
        except InputError as exc:
            raise relabel(exc, request.inputs[0].name) from None
        response = kpb.ModelInferResponse(model_name=result.model, model_version=result.version, id=request.id)
        encode_outputs(response, outputs, result.results, result.served)
        return response

    # -- the model repository extension (Triton's) --

    async def RepositoryIndex(self, request, context):
        Index = kpb.RepositoryIndexResponse.ModelIndex
        models = []
        for status in self._models.statuses():
            for v in status.versions:
                if request.ready and v.state is not State.READY:
                    continue
                state = "UNAVAILABLE" if v.state is State.FAILED else v.state.value  # Triton has no FAILED
                models.append(Index(name=status.name, version=str(v.version), state=state, reason=v.reason))
        return kpb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request, context):
        status = await self._models.load(request.model_name)
        failed = [v for v in status.versions if v.state is State.FAILED]
        if failed and not any(v.state is State.READY for v in status.versions):
            raise invalid(
                f"failed to load {request.model_name!r}: "
                + "; ".join(f"version {v.version}: {v.reason}" for v in failed)
            )
        return kpb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._models.unload(request.model_name)
        return kpb.RepositoryModelUnloadResponse()
