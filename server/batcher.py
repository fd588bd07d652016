"""The dynamic batcher: items from concurrent calls merged into model batches on a few model threads.

Each loaded model version has one (models never share a batch). A call's raw
items (image bytes or `RawTensor`s, see `bitmoji.server.inputs`) are queued as they arrive; each model thread
takes up to a batch of them, decodes them (the GIL is released for most of an
image decode) and runs the forward pass. With two threads one batch's decode
overlaps the other's forward, and the event loop never waits on a decode: per
call it only parses, queues and answers (one condition notify per call, one
`call_soon_threadsafe` per batch).

Rules, in order of importance:
- every accepted item is answered (a result, or its call's error), in its call's order;
- an item that fails to decode fails its call (the message names the item: the
  first failing one when the call fits one batch), never its batch-mates;
- a batch waits for more items at most `max_delay` after its FIRST item arrived
  (arrival = when its call was accepted, not when a model thread got round to
  polling: TorchServe's flaw), and only while another model thread is running
  a batch: an idle server (a lonely caller) never waits, and while the threads
  are busy the queue fills by itself, so batches grow with the load;
- only items of one shape share a forward pass (raw tensors for models without
  a declared shape may differ);
- the queue is bounded (items accepted and not yet in a batch): `run` refuses
  a call that does not fit, at once;
- items whose caller cancelled or whose deadline passed are dropped before
  decoding, and counted;
- a forward exception fails the calls of that batch only.

Model threads are plain threads, so batch timing does not depend on the
asyncio loop's latency; results go back to the loop in one
`call_soon_threadsafe` per batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

import torch

from bitmoji.core.preprocess import to_model_input
from bitmoji.server import metrics as m
from bitmoji.server import tracing
from bitmoji.server.calls import CURRENT_CALL
from bitmoji.server.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable
from bitmoji.server.inputs import InputError, InputSpec, Item, decode_input
from bitmoji.server.model import ServedModel, error_summary

log = logging.getLogger("bitmoji-serve")

# (an item, its index in the call, the model's spec) -> its tensor
Decode = Callable[[Item, int, InputSpec], torch.Tensor]


class QueueFull(ResourceExhausted):
    """The call's items do not fit in the queue now; try again later."""


class BatchFailed(Internal):
    """The forward pass of the batch holding one of the call's items raised; the message says how."""


class DeadlineExpired(DeadlineExceeded):
    """The call's deadline passed before its items reached the model."""


class ShuttingDown(Unavailable):
    """The batcher closed before the call's items ran."""


class _Call:
    __slots__ = ("future", "results", "remaining", "deadline", "abandoned", "finished", "model", "trace", "request_id")

    def __init__(self, future: asyncio.Future, n: int, deadline: float | None, span=None, request_id: str = ""):
        self.future = future
        self.results: list = [None] * n
        self.remaining = n
        self.deadline = deadline  # time.monotonic() value, or None
        self.abandoned = False  # set on the loop when the caller cancelled
        self.finished = False  # set on a model thread once answered or failed
        self.model: ServedModel | None = None  # the model that ran its (first) batch: what the call reports
        # traced calls only: [its RPC span, arrival, first decode start, last decode end] (see tracing.record_batch)
        self.trace: list | None = [span, 0.0, float("inf"), 0.0] if span is not None else None
        self.request_id = request_id  # for log lines written on a model thread, outside the call's context


class _Item:
    __slots__ = ("call", "index", "raw", "arrived")

    def __init__(self, call: _Call, index: int, raw, arrived: float):
        self.call = call
        self.index = index
        self.raw = raw
        self.arrived = arrived


def _resolve(completions: list) -> None:
    """On the loop: hand each finished call its results (or error), unless its caller is gone."""
    for future, value, error in completions:
        if not future.done():
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)


def _requests(items) -> dict:
    """`extra` for a log line about a batch: its calls' request ids and trace ids (see bitmoji.server.logs)."""
    calls = {id(item.call): item.call for item in items}.values()
    traces = {f"{c.trace[0].get_span_context().trace_id:032x}" for c in calls if c.trace is not None}
    return {"request_ids": sorted(c.request_id for c in calls if c.request_id), "trace_ids": sorted(traces)}


def build_batch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Items of one shape -> one batch; uint8 stays uint8 (converted on the device) unless mixed with floats."""
    if all(t.dtype == torch.uint8 for t in tensors):
        return torch.stack(tensors)
    return torch.stack([to_model_input(t) if t.dtype == torch.uint8 else t for t in tensors])


class Batcher:
    def __init__(
        self,
        model: ServedModel,
        *,
        decode: Decode = decode_input,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        metrics: m.VersionMetrics,
        name: tuple[str, str] = ("", ""),
        slots: threading.Semaphore | None = None,
        threads: int = 1,
        torch_threads: int | None = None,
    ):
        self._model = model
        self._torch_threads = torch_threads  # set on each model thread: see `_serve`
        self._decode = decode
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._name = name  # (model, version): for the batch's trace span
        # Batches running at once across every model version (shared by their batchers): one per core, so two
        # busy models share the cores instead of oversubscribing them with each one's model threads.
        self._slots = slots
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._busy = 0  # model threads running a batch
        self._answering = threading.Lock()  # a call's items may finish on two threads at once
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [
            threading.Thread(target=self._serve, name=f"bitmoji-model-{i}", daemon=True) for i in range(threads)
        ]

    @property
    def queued(self) -> int:
        """Items waiting for a batch now (read without the lock: a hint, e.g. for shadowing)."""
        return len(self._queue)

    # -- the model ------------------------------------------------------------

    @property
    def model(self) -> ServedModel:
        return self._model

    def swap_model(self, model: ServedModel) -> ServedModel:
        """Serve `model` from the next batch on (one reference assignment: atomic); returns the old one."""
        old, self._model = self._model, model
        return old

    # -- the loop side ----------------------------------------------------------

    async def run(self, raws, *, arrived: float, deadline: float | None = None) -> tuple[list, ServedModel]:
        """Queue a call's items, or raise QueueFull at once.

        Returns one result per item, in order, and the model that ran them.
        """
        loop = self._loop = asyncio.get_running_loop()
        info = CURRENT_CALL.get()
        call = _Call(loop.create_future(), len(raws), deadline, tracing.current_span(), info.request_id if info else "")
        if call.trace is not None:
            call.trace[1] = arrived
        items = [_Item(call, i, raw, arrived) for i, raw in enumerate(raws)]
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFull(f"queue full: {len(self._queue)} items waiting, room for {self.max_queue}; retry later")
            self._queue.extend(items)
            self._metrics.queue_depth.inc(len(items))  # under the lock: a model thread's dec never comes first
            self._cond.notify()
        try:
            return await call.future
        except asyncio.CancelledError:
            call.abandoned = True  # its items are dropped when they reach the head of the queue
            raise

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop the model threads; items still queued get ShuttingDown."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._threads[0].ident is None:  # never started: nobody else will answer the queue
                self._fail_leftovers()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- the model threads --------------------------------------------------------

    def _serve(self) -> None:
        if self._torch_threads:
            # torch keeps MKL's thread count per thread: a new thread's first GEMM would use every core
            # (the MLP's batch-32 first layer ran on 1.3 cores and took 14 ms instead of 8).
            torch.set_num_threads(self._torch_threads)
        while (items := self._next_batch()) is not None:
            self._metrics.queue_depth.dec(len(items))
            try:
                self._execute(items)
            except Exception:  # a bug here must not kill the model thread (every call would hang)
                log.exception("batcher error", extra=_requests(items))
                self._fail([item.call for item in items], BatchFailed("internal error in the batcher"))
            finally:
                if self._slots is not None:
                    self._slots.release()
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()  # a thread waiting for more items stops waiting when nobody is busy

    def _next_batch(self) -> list[_Item] | None:
        """Block until there is a batch to run (counted as busy, holding an execution slot), or None once closed.

        The slot is taken after the batch is due and before its items are: while the thread waits for one
        (another model's batch runs), this batch keeps growing.
        """
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        self._fail_leftovers()
                        return None
                    if not self._queue:
                        self._cond.wait()
                        continue
                    wait = self._time_to_wait()
                    if wait > 0:
                        self._cond.wait(wait)
                        continue
                    break
                if self._slots is None or self._slots.acquire(blocking=False):
                    return self._take()
            self._slots.acquire()  # every core is running a batch (of another model): wait for one to end
            with self._cond:
                if self._queue and not self._closed:
                    return self._take()
            self._slots.release()  # a sibling thread took the items meanwhile (or we are closing): start over

    def _take(self) -> list[_Item]:
        """Pop the next batch (lock held)."""
        self._busy += 1
        return [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]

    def _time_to_wait(self) -> float:
        """Adaptive wait (lock held): only while the batch is not full, another thread is busy, and time is left."""
        if self.max_delay_s <= 0 or self._busy == 0 or len(self._queue) >= self.max_batch_size:
            return 0.0
        return self._queue[0].arrived + self.max_delay_s - time.monotonic()

    def _fail_leftovers(self) -> None:
        leftover, self._queue = list(self._queue), collections.deque()
        if leftover:
            self._metrics.queue_depth.dec(len(leftover))
            self._fail([item.call for item in leftover], ShuttingDown("the server shut down before this call ran"))

    def _execute(self, items: list[_Item]) -> None:
        start = time.monotonic()
        metrics = self._metrics
        model = self._model  # read once: the whole batch is decoded for, runs on, and reports one model
        observe_wait = metrics.queue_wait.observe
        live: list[_Item] = []
        expired: list[_Call] = []
        for item in items:
            call = item.call
            if call.deadline is not None and start >= call.deadline:
                metrics.dropped[m.DROP_DEADLINE].inc()
                expired.append(call)
            elif call.abandoned:
                metrics.dropped[m.DROP_CANCELLED].inc()
            elif call.finished:  # another of its items failed
                metrics.dropped[m.DROP_FAILED].inc()
            else:
                observe_wait(start - item.arrived)
                live.append(item)
        if expired:
            self._fail(expired, DeadlineExpired("the deadline passed before the items reached the model"))
        groups = self._decode_all(live, model)
        for group in groups.values():
            group = [
                (item, tensor) for item, tensor in group if not item.call.finished
            ]  # a batch-mate failed to decode
            if group:
                self._forward(model, group, start)

    def _decode_all(self, live: list[_Item], model: ServedModel) -> dict[tuple, list]:
        """Decode each item for `model`; group them by shape (in queue order). An item that fails fails its call."""
        observe = self._metrics.preprocess.observe
        decode, spec = self._decode, model.spec
        groups: dict[tuple, list] = {}
        for item in live:
            if item.call.finished:
                continue
            t0 = time.perf_counter()
            trace = item.call.trace
            if trace is not None:
                trace[2] = min(trace[2], time.monotonic())
            try:
                tensor = decode(item.raw, item.index, spec)
            except InputError as exc:
                self._fail([item.call], exc)
                continue
            except Exception as exc:
                log.exception("decoding inputs[%d] failed", item.index, extra=_requests([item]))
                self._fail(
                    [item.call], BatchFailed(f"internal error decoding inputs[{item.index}]: {type(exc).__name__}")
                )
                continue
            observe(time.perf_counter() - t0)
            if trace is not None:
                trace[3] = time.monotonic()
            groups.setdefault(tuple(tensor.shape), []).append((item, tensor))
        return groups

    def _forward(self, model: ServedModel, group: list, batch_start: float = 0.0) -> None:
        metrics = self._metrics
        start = time.monotonic()
        try:
            results = model.predict(build_batch([tensor for _item, tensor in group]))
        except Exception as exc:
            reason = error_summary(exc)
            log.error(
                "forward pass failed on a batch of %d items of shape %s: %s",
                len(group), list(group[0][1].shape), reason, extra=_requests([item for item, _ in group]),
            )  # fmt: skip
            self._fail([item.call for item, _tensor in group], BatchFailed(f"model forward failed: {reason}"))
            return
        end = time.monotonic()
        metrics.forward.observe(end - start)
        metrics.batch_size.observe(len(group))
        traced = {id(item.call): item.call for item, _tensor in group if item.call.trace is not None}
        if traced:
            counts = collections.Counter(id(item.call) for item, _tensor in group)
            tracing.record_batch(
                [(*call.trace, counts[key]) for key, call in traced.items()],
                batch_start=batch_start, forward_start=start, forward_end=end, size=len(group),
                model=self._name[0], version=self._name[1],
            )  # fmt: skip
        metrics.items.inc(len(group))
        completions = []
        with self._answering:
            for (item, _tensor), result in zip(group, results, strict=True):
                call = item.call
                if call.finished:
                    continue
                if call.model is None:
                    call.model = model
                call.results[item.index] = result
                call.remaining -= 1
                if call.remaining == 0:
                    call.finished = True
                    completions.append((call.future, (call.results, call.model), None))
        if completions and self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, completions)

    def _fail(self, calls: list[_Call], error: Exception) -> None:
        completions = []
        with self._answering:
            for call in calls:
                if not call.finished:
                    call.finished = True
                    completions.append((call.future, None, error))
        if completions and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_resolve, completions)
