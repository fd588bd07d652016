"""The protocol-neutral engine under the servicers: admission, routing, batching, probes, model info, readiness.

Like KServe's `DataPlane` under its REST and gRPC servicers: each servicer
(`classifier`, `kserve`, `management`) turns its protocol's messages into
plain values, calls one method here, and turns the answer back. What a call
may ask, what it gets, and every failure (an `errors.EngineError` naming its
status) is decided here, once for every protocol.

Per call, on the event loop, the engine only checks the request, picks the
model version (`ModelManager.route`: a named version, or the default / canary
one) and queues the raw items on that version's batcher, whose model threads
decode and run them. A shadow version, when the model has one, gets the same
items after the caller has its answer (off its path), and the two answers are
compared in the `bitmoji_shadow_*` metrics. GradientProbe runs on a thread of
its own, so a probe never holds up a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from bitmoji.core.gradients import LOSSES, NotDifferentiable, ProbeError, ProbeResult, gradient_probe
from bitmoji.server import tracing
from bitmoji.server.batcher import BatchFailed, QueueFull, build_batch
from bitmoji.server.calls import CURRENT_CALL
from bitmoji.server.config import ServerConfig
from bitmoji.server.errors import FailedPrecondition, InvalidArgument, Unavailable, Unimplemented
from bitmoji.server.inputs import InputError, Item, decode_input
from bitmoji.server.metrics import REFUSED_QUEUE, REFUSED_UNLOADING, SHADOW_BUSY, SHADOW_FAILED, Metrics
from bitmoji.server.model import ServedModel, error_summary
from bitmoji.server.models import LoadedVersion, ModelManager, ModelStatus
from bitmoji.server.saliency import saliency_png

log = logging.getLogger("bitmoji-serve")

SHADOW_MAX_CALLS = 64  # shadow runs in flight at most; past that, calls are not shadowed (counted as busy)


@dataclass(frozen=True)
class InferResult:
    """One (logit, probability) per item, in order, and the model version that produced them."""

    results: list[list[float]]
    model: str
    version: str
    served: ServedModel  # build and labels of the file that answered


@dataclass(frozen=True)
class ProbeOutcome:
    result: ProbeResult
    saliency_pngs: list[bytes]  # one per input (b"" where not asked for, or not an image)
    model: str
    version: str
    served: ServedModel


@dataclass(frozen=True)
class ModelInfo:
    loaded: LoadedVersion
    status: ModelStatus
    config: ServerConfig = field(repr=False)
    torch_threads: int = 0


class Engine:
    def __init__(
        self, config: ServerConfig, manager: ModelManager, metrics: Metrics, *, probe_pool: Executor, torch_threads: int
    ):
        self.config = config
        self.manager = manager
        self._metrics = metrics
        self._probe_pool = probe_pool
        self._torch_threads = torch_threads
        self._shadow_tasks: set[asyncio.Task] = set()
        self.serving = False  # set by the server: SERVING between warm-up and drain

    # -- readiness --------------------------------------------------------------------

    def is_ready(self, model: str = "", version: str = "") -> bool:
        """The server is serving, and (when named) the model has that READY version (or any, unnamed)."""
        return self.serving and (not model and not version or self.manager.is_ready(model, version))

    # -- inference ----------------------------------------------------------------------

    def _check_count(self, n: int, limit: int, what: str) -> None:
        if n == 0:
            raise InvalidArgument("empty request: send at least one input")
        if n > limit:
            raise InvalidArgument(f"too many inputs: {n}; at most {limit} per {what}")

    @staticmethod
    def _note(loaded: LoadedVersion) -> None:
        call = CURRENT_CALL.get()
        if call is not None:
            call.model, call.version = loaded.model, loaded.label

    async def infer(
        self, items: list[Item], *, model: str = "", version: str = "", deadline: float | None = None
    ) -> InferResult:
        """Classify `items` on the model version the call names (or the default/canary one).

        `deadline` is a time.monotonic() value: items still queued past it are dropped, never run.
        """
        self._check_count(len(items), self.config.max_items_per_call, "call (split the request)")
        try:
            loaded, shadow = self.manager.route(model, version)
        except Unavailable:  # the version named is being unloaded
            self._metrics.refusals.labels(REFUSED_UNLOADING).inc()
            raise
        self._note(loaded)
        loaded.active += 1
        try:
            results, served = await loaded.batcher.run(items, arrived=time.monotonic(), deadline=deadline)
        except QueueFull:
            self._metrics.refusals.labels(REFUSED_QUEUE).inc()
            raise
        finally:
            loaded.active -= 1
        if shadow is not None:
            self._shadow(loaded, shadow, items, results)
        return InferResult(results, loaded.model, loaded.label, served)

    def _shadow(self, loaded: LoadedVersion, shadow: LoadedVersion, items: list[Item], results: list) -> None:
        """Run the same items on the shadow version in the background and compare; skip when it is busy."""
        if (
            len(self._shadow_tasks) >= SHADOW_MAX_CALLS
            or shadow.batcher.queued + len(items) > shadow.batching.max_queue // 2
        ):
            self._metrics.shadow_skipped.labels(loaded.model, SHADOW_BUSY).inc()
            return
        task = asyncio.ensure_future(self._compare(loaded, shadow, items, results))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _compare(self, loaded: LoadedVersion, shadow: LoadedVersion, items: list[Item], results: list) -> None:
        shadow.active += 1
        try:
            theirs, _ = await shadow.batcher.run(items, arrived=time.monotonic())
        except Exception as exc:  # the shadow's failure is never the caller's
            self._metrics.shadow_skipped.labels(loaded.model, SHADOW_FAILED).inc()
            log.debug("shadow run on %s version %s failed: %s", shadow.model, shadow.label, exc)
            return
        finally:
            shadow.active -= 1
        labels = (loaded.model, loaded.label, shadow.label)
        m = self._metrics
        disagree = sum((p >= 0.5) != (q >= 0.5) for (_, p), (_, q) in zip(results, theirs, strict=True))
        m.shadow_comparisons.labels(*labels).inc(len(results))
        if disagree:
            m.shadow_disagreements.labels(*labels).inc(disagree)
        observe = m.shadow_logit_difference.labels(*labels).observe
        for (z, _), (w, _) in zip(results, theirs, strict=True):
            observe(abs(z - w))

    # -- gradient probes ------------------------------------------------------------------

    async def probe(
        self,
        items: list[Item],
        targets: list[float],
        loss: str = "",
        *,
        model: str = "",
        version: str = "",
        saliency: bool = False,
    ) -> ProbeOutcome:
        """Forward, loss (`bce`, `mse`, or "" for the model's natural one), backward, on the version named
        (or the default one, never a canary): see `bitmoji.core.gradients`."""
        if not self.config.gradient_probe:
            # UNIMPLEMENTED: "not implemented or not supported/enabled in this service" (gRPC's status
            # definitions); clients must not retry it, and it says nothing about the caller's rights.
            raise Unimplemented("GradientProbe is disabled on this server (--disable-gradient-probe)")
        self._check_count(len(items), self.config.max_probe_inputs, "probe")
        loaded = self.manager.loaded(model, version)
        self._note(loaded)
        served = loaded.served
        loss = self._loss(loss, served)
        loaded.active += 1
        started = time.monotonic()
        try:
            loop = asyncio.get_running_loop()
            result, pngs = await loop.run_in_executor(
                self._probe_pool, self._probe, items, targets, loss, served, saliency
            )
        finally:
            loaded.active -= 1
        attributes = {"bitmoji.loss": loss, "bitmoji.items": len(items)}
        tracing.record_child("gradient_probe", started, time.monotonic(), attributes)
        self._metrics.probes.labels(loaded.model, loaded.label, loss).inc()
        return ProbeOutcome(result, pngs, loaded.model, loaded.label, served)

    @staticmethod
    def _loss(loss: str, served: ServedModel) -> str:
        if not loss:
            if served.loaded.class_names:
                return "bce"
            raise InvalidArgument("loss unspecified and the model has no class names: set LOSS_BCE or LOSS_MSE")
        if loss not in LOSSES:
            raise InvalidArgument(f"unknown loss {loss!r}; use LOSS_BCE or LOSS_MSE")
        return loss

    @staticmethod
    def _probe(
        items: list[Item], targets: list[float], loss: str, served: ServedModel, saliency: bool
    ) -> tuple[ProbeResult, list[bytes]]:
        """On the probe thread: decode, forward, loss and backward with autograd (no `.grad`, no train mode)."""
        tensors = [decode_input(item, i, served.spec) for i, item in enumerate(items)]
        shapes = [list(t.shape) for t in tensors]
        if any(s != shapes[0] for s in shapes):
            raise InputError(f"inputs: all inputs of one probe must have the same shape (got {shapes})")
        x = served.to_device(build_batch(tensors))
        try:
            result = gradient_probe(served.module, x, torch.tensor(targets, dtype=torch.float32), loss)
        except NotDifferentiable as exc:
            raise FailedPrecondition(f"{served.build}: {exc}") from None
        except ProbeError as exc:
            raise InvalidArgument(str(exc)) from None
        except Exception as exc:
            raise BatchFailed(f"gradient probe failed in the model: {error_summary(exc)}") from None
        pngs = [
            saliency_png(x[i], gradient) if saliency and gradient.dim() == 3 and gradient.shape[0] in (1, 3) else b""
            for i, gradient in enumerate(result.input_gradient)
        ]
        return result, pngs

    # -- what is served -----------------------------------------------------------------------

    def model_info(self, model: str = "", version: str = "") -> ModelInfo:
        loaded = self.manager.loaded(model, version)
        self._note(loaded)
        return ModelInfo(loaded, self.manager.status(loaded.model), self.config, self._torch_threads)
