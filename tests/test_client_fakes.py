"""The other side for the client's tests: a grpc.aio server (as the real one is) on a loopback port, with a
scripted Classifier and a small ModelRepository that speak the new proto. No tests here.

They fake the server, not the client: the client under test talks real gRPC to them. The fake follows the
proto's contract: empty names mean the default model and version, every response names the model, version
and build that answered, and the server sends the call's x-request-id back in its trailing metadata
(generating one when the call had none).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc

READY, FAILED, UNAVAILABLE = pb.MODEL_STATE_READY, pb.MODEL_STATE_FAILED, pb.MODEL_STATE_UNAVAILABLE


class AioServer:
    """A grpc.aio server run by an event loop in its own thread; `add(server)` callables register servicers."""

    def __init__(self, *adders: Callable[[grpc.aio.Server], None], port: int = 0):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self.run(self._start(adders, port))

    async def _start(self, adders, port: int):
        server = grpc.aio.server()
        for add in adders:
            add(server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server, bound

    def run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """None: cancel the calls in flight (they end CANCELLED); a grace: GOAWAY, answer them, then stop."""
        if self.loop.is_running():
            self.run(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def version(number: str, state: int = READY, reason: str = "", build: str = "") -> pb.ModelVersionStatus:
    return pb.ModelVersionStatus(
        version=number,
        state=state,
        reason=reason,
        build=build or (f"b{number}" if state == READY else ""),
        architecture="cnn" if state == READY else "",
        memory_bytes=50 * 2**20 if state == READY else 0,
    )


class FakeRepository(classifier_pb2_grpc.ModelRepositoryServicer):
    """Two models: cnn (versions 1, 2 READY, 3 in the repository only) and mlp (1 READY); cnn is the default.
    A version named "bad" fails to load. With `token`, every call needs `authorization: Bearer <token>`."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.metadata: list[dict[str, str]] = []
        self.models: dict[str, pb.ModelStatus] = {
            "cnn": pb.ModelStatus(
                name="cnn", versions=[version("1"), version("2"), version("3", UNAVAILABLE, "not loaded")]
            ),
            "mlp": pb.ModelStatus(name="mlp", versions=[version("1")]),
        }
        self.default_model = "cnn"
        for model in self.models.values():
            self._refresh(model)

    @staticmethod
    def _refresh(model: pb.ModelStatus) -> None:
        ready = [v.version for v in model.versions if v.state == READY]
        if not model.default_pinned or model.default_version not in ready:
            model.default_version = max(ready, key=int) if ready else ""

    async def _check(self, context) -> None:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        if self.token and metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the management token is needed")

    async def _model(self, name: str, context) -> pb.ModelStatus:
        if name not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model named {name!r}")
        return self.models[name]

    async def _ready(self, model: pb.ModelStatus, number: str, context) -> None:
        if not any(v.version == number and v.state == READY for v in model.versions):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{model.name} version {number} is not READY")

    async def ListModels(self, request, context):
        await self._check(context)
        models = [m for m in self.models.values() if not request.ready_only or m.default_version]
        return pb.ListModelsResponse(models=models, default_model=self.default_model)

    async def LoadModel(self, request, context):
        await self._check(context)
        model = await self._model(request.model_name, context)
        wanted = list(request.versions) or [v.version for v in model.versions]
        for number in wanted:
            existing = [v for v in model.versions if v.version == number]
            state = FAILED if number == "bad" else READY
            reason = "bad.pt: not a TorchScript file" if state == FAILED else ""
            if existing:
                existing[0].CopyFrom(version(number, state, reason))
            else:
                model.versions.append(version(number, state, reason))
        self._refresh(model)
        return pb.LoadModelResponse(model=model)

    async def UnloadModel(self, request, context):
        await self._check(context)
        model = await self._model(request.model_name, context)
        for v in model.versions:
            if not request.versions or v.version in request.versions:
                v.CopyFrom(version(v.version, UNAVAILABLE, "unloaded"))
        self._refresh(model)
        return pb.UnloadModelResponse(model=model)

    async def SetDefaultVersion(self, request, context):
        await self._check(context)
        model = await self._model(request.model_name, context)
        if request.version:
            await self._ready(model, request.version, context)
        model.previous_default_version = model.default_version
        model.default_pinned = bool(request.version)
        model.default_version = request.version
        if model.canary_version == request.version:
            model.canary_version, model.canary_weight = "", 0.0
        if model.shadow_version == request.version:
            model.shadow_version = ""
        self._refresh(model)
        return pb.SetDefaultVersionResponse(model=model)

    async def SetTraffic(self, request, context):
        await self._check(context)
        model = await self._model(request.model_name, context)
        for number in filter(None, (request.canary_version, request.shadow_version)):
            await self._ready(model, number, context)
        model.canary_version, model.canary_weight = request.canary_version, request.canary_weight
        model.shadow_version = request.shadow_version
        return pb.SetTrafficResponse(model=model)


class FakeClassifier(classifier_pb2_grpc.ClassifierServicer):
    """Answers as the repository's model and version the call names (or their defaults). Scripted faults:
    the first `failures` attempts of Classify, GradientProbe and StreamClassify end with `code` (after
    `headers_first`: sending response headers first; `stream_fail_after`: the stream's n-th answer),
    with `pushback` as grpc-retry-pushback-ms. Records every attempt's time, metadata and request."""

    def __init__(self, repository: FakeRepository | None = None):
        self.repository = repository or FakeRepository()
        self.attempts: list[float] = []
        self.metadata: list[dict[str, str]] = []
        self.requests: list[object] = []
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.pushback: str | None = None
        self.headers_first = False
        self.stream_fail_after = 0
        self.request_ids = 0

    def _answerer(self, request) -> tuple[str, str, str]:
        model = self.repository.models[request.model_name or self.repository.default_model]
        number = request.model_version or model.default_version
        build = next((v.build for v in model.versions if v.version == number), "")
        return model.name, number, build

    async def _attempt(self, request, context) -> bool:
        """Records the attempt and sends the request id back; True when this attempt is to fail."""
        self.attempts.append(time.monotonic())
        self.requests.append(request)
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        self.request_ids += 1
        trailing = [("x-request-id", metadata.get("x-request-id") or f"srv-{self.request_ids}")]
        if self.pushback is not None:
            trailing.append(("grpc-retry-pushback-ms", self.pushback))
        context.set_trailing_metadata(trailing)
        return len(self.attempts) <= self.failures

    async def Classify(self, request, context):
        if await self._attempt(request, context):
            if self.headers_first:
                await context.send_initial_metadata((("x-served-by", "fake"),))
            await context.abort(self.code, f"scripted failure {len(self.attempts)}")
        if any(i.image == b"bad" for i in request.inputs):
            index = next(i for i, item in enumerate(request.inputs) if item.image == b"bad")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inputs[{index}]: not an image Pillow can read")
        name, number, build = self._answerer(request)
        return pb.ClassifyResponse(
            predictions=[pb.Prediction(label="eva", probability=0.75, logit=1.0986) for _ in request.inputs],
            model_name=name,
            model_version=number,
            model_build=build,
        )

    async def StreamClassify(self, request_iterator, context):
        fail = None
        sent = 0
        async for request in request_iterator:
            if fail is None:
                fail = await self._attempt(request, context)
            if fail and sent == self.stream_fail_after:
                await context.abort(self.code, f"scripted stream failure after {sent} answers")
            name, number, build = self._answerer(request)
            sent += 1
            yield pb.ClassifyResponse(
                predictions=[pb.Prediction(label=str(len(request.inputs)), probability=0.5) for _ in request.inputs],
                model_name=name,
                model_version=number,
                model_build=build,
            )

    async def GradientProbe(self, request, context):
        if await self._attempt(request, context):
            await context.abort(self.code, f"scripted failure {len(self.attempts)}")
        name, number, build = self._answerer(request)
        count = len(request.inputs)
        return pb.GradientProbeResponse(
            loss=0.5,
            outputs=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[count, 1], data=b"\x00\x00\x80\x3f" * count),
            parameters=[
                pb.ParameterGradient(
                    name="w",
                    shape=[2, 2],
                    norm=1.0,
                    values=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\x00\x00\x00\x40" * 4),
                )
            ],
            input_gradients=[
                pb.InputGradient(gradient=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[3], data=b"\x01\x02\x03"))
            ]
            * count,
            model_name=name,
            model_version=number,
            model_build=build,
        )

    async def GetModelInfo(self, request, context):
        await self._attempt(request, context)
        name, number, build = self._answerer(request)
        return pb.GetModelInfoResponse(
            model_name=name,
            model_version=number,
            model_build=build,
            architecture="cnn",
            class_names=["eva", "not_eva"],
            positive_class="eva",
            input_shape=[3, 128, 128],
            metadata_json='{"metrics": {"accuracy": 0.9, "by_class": {"eva": 0.8}}, "input": {"shape": [3, 128, 128]}}',
            device="cpu",
            status=self.repository.models[name],
        )


def serve(
    classifier: FakeClassifier | None = None, repository: FakeRepository | None = None, port: int = 0
) -> tuple[AioServer, FakeClassifier]:
    """A server with the Classifier, the ModelRepository and health (SERVING)."""
    repository = repository or (classifier.repository if classifier else FakeRepository())
    classifier = classifier or FakeClassifier(repository)
    server = AioServer(
        lambda s: classifier_pb2_grpc.add_ClassifierServicer_to_server(classifier, s),
        lambda s: classifier_pb2_grpc.add_ModelRepositoryServicer_to_server(repository, s),
        lambda s: health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), s),
        port=port,
    )
    return server, classifier
