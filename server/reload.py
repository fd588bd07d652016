"""Model hot reload: on SIGHUP, or when the model file changes (`--reload-poll-s`).

The new file is loaded, checked and warmed up on a worker thread beside the
model that keeps serving, then swapped in with one reference assignment (the
batcher reads the model once per batch), so no call fails or waits for the
swap. Checks before the swap: the file loads (`ModelFileError` otherwise); it
takes the same inputs (item shape, image preprocessing) and has the same
classes as the served model (callers must not see labels change under them);
a forward pass on zeros gives one finite logit per item; warm-up runs at every
batch size. A file that fails any check is refused: one error line in the log,
`bitmoji_model_reloads_total{result="failed"}` counts it, the old model keeps
serving. A file whose SHA-256 equals the served one's is left alone.

Only the path the operator gave (`--model`) is ever loaded: clients cannot
name files. Replace the file atomically (write beside it, then rename), as
`bitmoji-train` does; the poller also waits for the file's size and mtime to
settle before loading, and a half-written file is refused and retried when it
changes again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time

import torch
from prometheus_client import Counter

from bitmoji.core.modelfile import ModelFileError, load_model
from bitmoji.server.config import ServerConfig
from bitmoji.server.model import ServedModel, error_summary

log = logging.getLogger("bitmoji-serve")

RESULT_OK = "ok"
RESULT_FAILED = "failed"


class ReloadRefused(Exception):
    """The new model file cannot replace the served one; the message says why."""


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns), or None while the file is missing: a change means a new file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_compatible(old: ServedModel, new: ServedModel) -> None:
    """The new model must take the same inputs and name the same classes as the one it replaces."""
    if new.spec.shape != old.spec.shape:
        raise ReloadRefused(
            f"input shape {_shape(new.spec.shape)} differs from the served model's {_shape(old.spec.shape)}"
        )
    if new.spec.image_size != old.spec.image_size:
        raise ReloadRefused(f"image size {new.spec.image_size} differs from the served model's {old.spec.image_size}")
    if (new.loaded.class_names or []) != (old.loaded.class_names or []) or new.positive_label != old.positive_label:
        raise ReloadRefused(
            f"classes {new.loaded.class_names} (positive {new.positive_label!r}) differ from the served model's "
            f"{old.loaded.class_names} (positive {old.positive_label!r})"
        )


def check_forward(model: ServedModel) -> None:
    """Zeros in, one finite logit per item out (skipped for a model without a known input shape)."""
    if model.spec.shape is None:
        return
    dtype = torch.uint8 if model.spec.image_size else torch.float32
    results = model.predict(torch.zeros((2, *model.spec.shape), dtype=dtype))  # raises on a wrong output shape
    if not all(math.isfinite(logit) for logit, _ in results):
        raise ReloadRefused("the model gives non-finite outputs on zeros")


def _shape(shape) -> str:
    return "undeclared" if shape is None else str(list(shape))


class ModelReloader:
    """Reloads `config.model` into `service` on request (SIGHUP) or when the file changes; one reload at a time."""

    def __init__(self, config: ServerConfig, service, metrics):
        self._config = config
        self._service = service
        self._lock = asyncio.Lock()
        self._ready = False
        self._pending: str | None = None  # a trigger that came before the server was ready
        self._tasks: set[asyncio.Task] = set()
        self._stamp = file_stamp(config.model)
        self.reloads = Counter(
            "bitmoji_model_reloads",
            "Model hot reloads, by result (ok: swapped in; failed: refused, the old model serves on).",
            ["result"],
            registry=metrics.registry,
        )
        for result in (RESULT_OK, RESULT_FAILED):
            self.reloads.labels(result)

    def request(self, trigger: str = "SIGHUP") -> None:
        """Reload soon (from a signal handler on the loop); before the server is ready, once it is."""
        if not self._ready:
            self._pending = trigger
            log.info("%s before ready: the model is reloaded once the server is ready", trigger)
            return
        self._spawn(self.reload(trigger))

    def start(self) -> None:
        """The server is ready: run a reload that was asked for meanwhile, and start polling if configured."""
        self._ready = True
        if self._pending:
            self._spawn(self.reload(self._pending))
            self._pending = None
        if self._config.reload_poll_s > 0:
            self._spawn(self._poll())

    async def stop(self) -> None:
        """Cancel polling and any reload not yet swapped in (its thread finishes, its result is dropped)."""
        self._ready = False
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self) -> None:
        interval = self._config.reload_poll_s
        while True:
            await asyncio.sleep(interval)
            stamp = await asyncio.to_thread(file_stamp, self._config.model)
            if stamp is None or stamp == self._stamp:
                continue
            await asyncio.sleep(min(interval, 0.5))  # let a writer finish: reload only a file that stood still
            if await asyncio.to_thread(file_stamp, self._config.model) != stamp:
                continue
            await self.reload("file change", only_if_changed=True)

    async def reload(self, trigger: str, *, only_if_changed: bool = False) -> bool:
        """Load, check, warm up and swap in the model file; True when the new model serves (or nothing changed).

        `only_if_changed` (the poller): skip a file that a reload already took, e.g. a SIGHUP
        that arrived while the poller let the file settle, so one file is tried once.
        """
        async with self._lock:
            started = time.monotonic()
            old = self._service.model
            stamp = await asyncio.to_thread(file_stamp, self._config.model)
            if only_if_changed and stamp == self._stamp:
                return True
            try:
                new = await asyncio.to_thread(self._prepare, old)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # anything: a reload must never take the server down
                reason = str(exc) if isinstance(exc, (ReloadRefused, ModelFileError)) else error_summary(exc)
                self.reloads.labels(RESULT_FAILED).inc()
                log.error("model reload (%s) refused: %s; still serving %s", trigger, reason, old.version)
                return False
            finally:
                self._stamp = stamp if stamp is not None else self._stamp
            if new is None:
                log.info(
                    "model reload (%s): %s is unchanged (same SHA-256); still serving %s",
                    trigger,
                    self._config.model,
                    old.version,
                )
                return True
            self._service.swap_model(new)
            self.reloads.labels(RESULT_OK).inc()
            log.info(
                "model reloaded (%s): %s -> %s in %.2f s", trigger, old.version, new.version, time.monotonic() - started
            )
            return True

    def _prepare(self, old: ServedModel) -> ServedModel | None:
        """On a worker thread: the new model, checked and warmed up; None when the file is the served one."""
        loaded = load_model(self._config.model, old.device)
        if loaded.sha256 == old.loaded.sha256:
            return None
        new = ServedModel.create(loaded, max_pixels=self._config.max_image_pixels, input_shape=self._config.input_shape)
        check_compatible(old, new)
        check_forward(new)
        new, forward = new.optimized(self._config.max_batch_size, self._config.optimize)
        log.info("reload: %s's forward pass: %s", new.version, forward)
        new.warmup(self._config.max_batch_size)
        return new
