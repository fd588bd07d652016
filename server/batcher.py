"""The dynamic batcher: items from concurrent calls merged into model batches on one model thread.

Rules, in order of importance:
- every accepted item is answered (a result, or its call's error), in its call's order;
- a batch waits for more items at most `max_delay` after its FIRST item arrived
  (arrival = when its call was accepted, before preprocessing; not when the
  model thread got round to polling: TorchServe's flaw);
- it waits only while more items are on their way (accepted, still being
  preprocessed): a lonely caller never waits, and while the model thread is
  busy the queue fills by itself, so batches grow with the load;
- only items of one shape share a batch (raw tensors for models without a
  declared shape may differ);
- the queue is bounded (items accepted and not yet in a batch): `admit` refuses
  a call that does not fit, at once;
- items whose caller cancelled or whose deadline passed are dropped before the
  forward pass, and counted;
- a forward exception fails the calls of that batch only.

The model thread is a plain thread owning its loop, so batch timing does not
depend on the asyncio loop's latency; results go back to the loop in one
`call_soon_threadsafe` per batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

import torch

from server import metrics as m
from server.model import ServedModel, error_summary
from trainer.preprocess import to_model_input

log = logging.getLogger("bitmoji-serve")


class QueueFull(Exception):
    """The call's items do not fit in the queue now; try again later."""


class BatchFailed(RuntimeError):
    """The forward pass of the batch holding one of the call's items raised; the message says how."""


class DeadlineExpired(Exception):
    """The call's deadline passed before its items reached the model."""


class ShuttingDown(Exception):
    """The batcher closed before the call's items ran."""


class _Call:
    __slots__ = ("future", "results", "remaining", "deadline", "abandoned", "finished")

    def __init__(self, future: asyncio.Future, n: int, deadline: float | None):
        self.future = future
        self.results: list = [None] * n
        self.remaining = n
        self.deadline = deadline  # time.monotonic() value, or None
        self.abandoned = False  # set on the loop when the caller cancelled
        self.finished = False  # set on the model thread once answered or failed


class _Item:
    __slots__ = ("call", "index", "tensor", "shape", "arrived", "enqueued")

    def __init__(self, call: _Call, index: int, tensor: torch.Tensor, arrived: float, enqueued: float):
        self.call = call
        self.index = index
        self.tensor = tensor
        self.shape = tensor.shape
        self.arrived = arrived
        self.enqueued = enqueued


def _resolve(completions: list) -> None:
    """On the loop: hand each finished call its results (or error), unless its caller is gone."""
    for future, value, error in completions:
        if not future.done():
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)


def build_batch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Items of one shape -> one batch; uint8 stays uint8 (converted on the device) unless mixed with floats."""
    if all(t.dtype == torch.uint8 for t in tensors):
        return torch.stack(tensors)
    return torch.stack([to_model_input(t) if t.dtype == torch.uint8 else t for t in tensors])


class Batcher:
    def __init__(self, model: ServedModel, *, max_batch_size: int, max_delay_s: float, max_queue: int, metrics: m.Metrics):
        self._model = model
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._admitted = 0  # accepted and not yet in a batch: the bounded quantity
        self._pending = 0  # of those, still being preprocessed (more items on their way)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="bitmoji-model", daemon=True)

    # -- the model ------------------------------------------------------------

    @property
    def model(self) -> ServedModel:
        return self._model

    def swap_model(self, model: ServedModel) -> ServedModel:
        """Serve `model` from the next batch on (one reference assignment: atomic); returns the old one."""
        old, self._model = self._model, model
        return old

    # -- the loop side ----------------------------------------------------------

    def admit(self, n: int) -> None:
        """Reserve room for a call's `n` items, or raise QueueFull. Follow with `run` or `withdraw`."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if self._admitted + n > self.max_queue:
                raise QueueFull(f"queue full: {self._admitted} items waiting, room for {self.max_queue}; retry later")
            self._admitted += n
            self._pending += n
        self._metrics.queue_depth.inc(n)

    def withdraw(self, n: int) -> None:
        """Release admitted items that will never be submitted (their call failed preprocessing)."""
        with self._cond:
            self._admitted -= n
            self._pending -= n
            self._cond.notify()
        self._metrics.queue_depth.dec(n)

    async def run(self, tensors: list[torch.Tensor], *, arrived: float, deadline: float | None = None) -> tuple[list, str]:
        """Queue admitted items; returns (one result per item, in order; the version of the model that ran them)."""
        loop = self._loop = asyncio.get_running_loop()
        call = _Call(loop.create_future(), len(tensors), deadline)
        now = time.monotonic()
        items = [_Item(call, i, t, arrived, now) for i, t in enumerate(tensors)]
        with self._cond:
            self._pending -= len(items)
            if self._closed:
                self._admitted -= len(items)
                raise ShuttingDown("the server is shutting down")
            self._queue.extend(items)
            self._cond.notify()
        try:
            return await call.future
        except asyncio.CancelledError:
            call.abandoned = True  # its items are dropped when they reach the head of the queue
            raise

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop the model thread; items still queued get ShuttingDown."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            if self._thread.ident is None:  # never started: nobody else will answer the queue
                leftover, self._queue = list(self._queue), collections.deque()
                self._fail([item.call for item in leftover], ShuttingDown("the server shut down before this call ran"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return self._admitted

    # -- the model thread -------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    leftover, self._queue = list(self._queue), collections.deque()
                    self._fail([item.call for item in leftover], ShuttingDown("the server shut down before this call ran"))
                    return
                self._wait_for_more()
                items = self._take()
                self._admitted -= len(items)
            self._metrics.queue_depth.dec(len(items))
            try:
                self._execute(items)
            except Exception:  # a bug here must not kill the model thread (every call would hang)
                log.exception("batcher error")
                self._fail([item.call for item in items], BatchFailed("internal error in the batcher"))

    def _wait_for_more(self) -> None:
        """Adaptive wait (lock held): only while the batch is not full, more items are coming, and time is left."""
        if self.max_delay_s <= 0:
            return
        due = self._queue[0].arrived + self.max_delay_s
        while len(self._queue) < self.max_batch_size and self._pending > 0 and not self._closed:
            remaining = due - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take(self) -> list[_Item]:
        """Up to max_batch_size items with the head item's shape, in queue order (lock held)."""
        queue, limit = self._queue, self.max_batch_size
        shape = queue[0].shape
        batch: list[_Item] = []
        others: list[_Item] = []
        while queue and len(batch) < limit:
            item = queue.popleft()
            (batch if item.shape == shape else others).append(item)
        queue.extendleft(reversed(others))
        return batch

    def _execute(self, items: list[_Item]) -> None:
        start = time.monotonic()
        metrics = self._metrics
        live: list[_Item] = []
        expired: list[_Call] = []
        for item in items:
            call = item.call
            if call.deadline is not None and start >= call.deadline:
                metrics.items_dropped.labels(m.DROP_DEADLINE).inc()
                expired.append(call)
            elif call.abandoned:
                metrics.items_dropped.labels(m.DROP_CANCELLED).inc()
            elif call.finished:  # another of its items failed
                metrics.items_dropped.labels(m.DROP_FAILED).inc()
            else:
                live.append(item)
        if expired:
            self._fail(expired, DeadlineExpired("the deadline passed before the items reached the model"))
        if not live:
            return
        model = self._model  # read once: the whole batch runs on, and reports, one model
        try:
            batch = build_batch([item.tensor for item in live])
            results = model.predict(batch)
        except Exception as exc:
            reason = error_summary(exc)
            log.error("forward pass failed on a batch of %d items of shape %s: %s", len(live), list(live[0].shape), reason)
            self._fail([item.call for item in live], BatchFailed(f"model forward failed: {reason}"))
            return
        end = time.monotonic()
        metrics.forward_duration.observe(end - start)
        metrics.batch_size.observe(len(live))
        metrics.items.inc(len(live))
        observe_wait = metrics.queue_wait.observe
        completions = []
        version = model.version
        for item, result in zip(live, results):
            observe_wait(start - item.enqueued)
            call = item.call
            if call.finished:
                continue
            call.results[item.index] = result
            call.remaining -= 1
            if call.remaining == 0:
                call.finished = True
                completions.append((call.future, (call.results, version), None))
        if completions:
            self._loop.call_soon_threadsafe(_resolve, completions)

    def _fail(self, calls: list[_Call], error: Exception) -> None:
        completions = []
        for call in calls:
            if not call.finished:
                call.finished = True
                completions.append((call.future, None, error))
        if completions and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_resolve, completions)
