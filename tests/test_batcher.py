"""The batcher and the served model in-process (no subprocess, no gRPC): the batcher's timing, grouping,
ordering and failure rules with a real model on the real model threads; the choice of Classify's
forward module (--optimize).
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from helpers import export_test_model
from torch import nn

from bitmoji.core import modelfile
from bitmoji.server.batcher import Batcher, BatchFailed, QueueFull, ShuttingDown
from bitmoji.server.inputs import InputError
from bitmoji.server.metrics import Metrics
from bitmoji.server.model import ServedModel

# -- configuration ----------------------------------------------------------------


# -- the batcher ------------------------------------------------------------------


class SumNet(nn.Module):
    """Any item shape -> one logit per item: the sum of its values times `scale`."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1, keepdim=True) * self.scale


VERSION = {"model": "m", "version": "1"}


def served(tmp_path, scale: float = 1.0) -> ServedModel:
    path = modelfile.export_torchscript(
        SumNet(scale), tmp_path / f"sum{scale}.pt", {"model_version": f"sum-{scale}"}, torch.ones(2, 3)
    )
    return ServedModel.create(modelfile.load_model(path), max_pixels=1 << 20)


def decode(raw, index: int, spec) -> torch.Tensor:
    """The test batcher's decoder: items are ("value", shape) pairs; "slow" sleeps, "bad" fails, "boom" is a bug."""
    value, shape = raw
    if value == "slow":
        time.sleep(0.5)
        value = 0
    elif value == "bad":
        raise InputError(f"inputs[{index}]: bad item")
    elif value == "boom":
        raise KeyError("a bug")
    return torch.full(shape, float(value))


def run_batcher(model: ServedModel, scenario, **settings):
    """Run `scenario(batcher)` on a started batcher; returns (its result, the batcher's metrics)."""
    metrics = Metrics()
    options = {"decode": decode, "max_batch_size": 32, "max_delay_s": 0.3, "max_queue": 64, "threads": 1, **settings}

    async def main():
        batcher = Batcher(model, metrics=metrics.version_metrics("m", "1"), **options)
        batcher.start()
        try:
            return await asyncio.wait_for(scenario(batcher), 10)
        finally:
            batcher.close(timeout=5)

    return asyncio.run(main()), metrics


def items(*values, shape=(2,)):
    return [(v, shape) for v in values]


def logits(results):
    return [round(logit, 4) for logit, _probability in results]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_lonely_caller_does_not_wait(tmp_path, threads):
    async def scenario(batcher):
        started = time.monotonic()
        results, model = await batcher.run(items(1), arrived=started)
        return time.monotonic() - started, results, model.build

    (elapsed, results, version), _ = run_batcher(served(tmp_path), scenario, max_delay_s=1.0, threads=threads)
    assert logits(results) == [2.0] and version == "sum-1.0"
    assert elapsed < 0.2, f"waited {elapsed:.3f}s with nobody else around"


def test_a_batch_waits_while_another_thread_is_busy_at_most_the_delay_from_its_first_arrival(tmp_path):
    async def scenario(batcher):
        busy = asyncio.ensure_future(batcher.run(items("slow"), arrived=time.monotonic()))  # one thread busy 0.5 s
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await batcher.run(items(1), arrived=started)
        full_wait = time.monotonic() - started
        await busy
        busy = asyncio.ensure_future(batcher.run(items("slow"), arrived=time.monotonic()))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await batcher.run(items(1), arrived=started - 0.25)  # arrived 0.25 s ago: only 0.05 s of the delay left
        late_wait = time.monotonic() - started
        await busy
        return full_wait, late_wait

    (full_wait, late_wait), _ = run_batcher(served(tmp_path), scenario, max_delay_s=0.3, threads=2)
    assert 0.25 <= full_wait < 0.45, f"waited {full_wait:.3f}s: not the 0.3 s delay"
    assert late_wait < 0.2, f"the delay was counted from when the model thread polled ({late_wait:.3f}s)"


def test_concurrent_calls_share_a_batch_and_each_gets_its_own_results_in_order(tmp_path):
    async def scenario(batcher):
        blocker = asyncio.ensure_future(batcher.run(items("slow"), arrived=time.monotonic()))  # the one thread is busy
        await asyncio.sleep(0.05)
        now = time.monotonic()
        first = asyncio.ensure_future(batcher.run(items(1, 2, 3), arrived=now))
        await asyncio.sleep(0.02)
        second = await batcher.run(items(10, 20), arrived=now)
        await blocker
        return await first, second

    ((first, _), (second, _)), metrics = run_batcher(served(tmp_path), scenario)
    assert logits(first) == [2.0, 4.0, 6.0] and logits(second) == [20.0, 40.0]
    assert (
        metrics.registry.get_sample_value("bitmoji_batch_size_count", VERSION) == 2
    )  # the blocker's, then one for both calls
    assert metrics.registry.get_sample_value("bitmoji_batch_size_sum", VERSION) == 6


@pytest.mark.parametrize("threads", [1, 2])
def test_a_big_call_is_split_into_batches_and_items_of_other_shapes_never_share_one(tmp_path, threads):
    async def scenario(batcher):
        return await batcher.run(items(1, 2, 3, 4, 5) + items(1, shape=(3,)) + items(6), arrived=time.monotonic())

    (results, _), metrics = run_batcher(served(tmp_path), scenario, max_batch_size=4, threads=threads)
    assert logits(results) == [2.0, 4.0, 6.0, 8.0, 10.0, 3.0, 12.0]
    sizes = (
        metrics.registry.get_sample_value("bitmoji_batch_size_sum", VERSION),
        metrics.registry.get_sample_value("bitmoji_batch_size_count", VERSION),
    )
    assert sizes == (7, 3)  # [1 2 3 4] then [5 6] and the one of shape (3,)


def test_an_item_that_fails_to_decode_fails_its_call_only(tmp_path):
    async def scenario(batcher):
        blocker = asyncio.ensure_future(batcher.run(items("slow"), arrived=time.monotonic()))
        await asyncio.sleep(0.05)
        now = time.monotonic()
        good = asyncio.ensure_future(batcher.run(items(1, 2), arrived=now))
        bad = asyncio.ensure_future(batcher.run(items(3, "bad", "bad"), arrived=now))  # same batch as `good`
        buggy = asyncio.ensure_future(batcher.run(items("boom"), arrived=now))
        await blocker
        results = await asyncio.gather(good, bad, buggy, return_exceptions=True)
        return results

    (good, bad, buggy), metrics = run_batcher(served(tmp_path), scenario)
    assert logits(good[0]) == [2.0, 4.0]
    assert isinstance(bad, InputError) and str(bad) == "inputs[1]: bad item"  # the first failing item
    assert isinstance(buggy, BatchFailed) and "internal error decoding inputs[0]: KeyError" in str(buggy)
    assert (
        metrics.registry.get_sample_value("bitmoji_batch_size_sum", VERSION) == 3
    )  # "slow", then 1 and 2: no item of `bad`


def test_the_queue_is_bounded(tmp_path):
    async def scenario(batcher):
        blocker = asyncio.ensure_future(batcher.run(items("slow"), arrived=time.monotonic()))
        await asyncio.sleep(0.05)  # taken: the queue is empty again
        waiting = asyncio.ensure_future(batcher.run(items(1, 2, 3, 4), arrived=time.monotonic()))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue full: 4 items waiting, room for 4"):
            await batcher.run(items(5), arrived=time.monotonic())
        await blocker
        return (await waiting)[0]

    results, metrics = run_batcher(served(tmp_path), scenario, max_queue=4)
    assert logits(results) == [2.0, 4.0, 6.0, 8.0]
    assert metrics.registry.get_sample_value("bitmoji_queue_depth", VERSION) == 0


def test_closing_answers_every_queued_call(tmp_path):
    async def scenario(batcher):
        blocker = asyncio.ensure_future(batcher.run(items("slow"), arrived=time.monotonic()))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.run(items(1), arrived=time.monotonic()))
        await asyncio.sleep(0)
        await asyncio.to_thread(batcher.close, 5)
        return await asyncio.gather(blocker, queued, return_exceptions=True)

    (ran, refused), _ = run_batcher(served(tmp_path), scenario)
    assert logits(ran[0]) == [0.0]  # the running batch finished
    assert isinstance(refused, ShuttingDown)


def test_swap_model_serves_the_new_model_from_the_next_batch(tmp_path):
    new = served(tmp_path, scale=10.0)

    async def scenario(batcher):
        before = await batcher.run(items(1), arrived=time.monotonic())
        old = batcher.swap_model(new)
        after = await batcher.run(items(1), arrived=time.monotonic())
        return before, after, old.build

    ((before, m1), (after, m2), old), _ = run_batcher(served(tmp_path), scenario)
    assert (logits(before), m1.build, old) == ([2.0], "sum-1.0", "sum-1.0")
    assert (logits(after), m2.build) == ([20.0], "sum-10.0")


def test_model_threads_run_with_the_servers_torch_thread_count(tmp_path):
    """torch keeps the intra-op (and MKL) thread count per thread: a model thread must set its own."""
    seen = []

    def recording_decode(raw, index, spec):
        seen.append(torch.get_num_threads())
        return decode(raw, index, spec)

    async def scenario(batcher):
        return await batcher.run(items(1, 2), arrived=time.monotonic())

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what a new thread would inherit
    try:
        run_batcher(served(tmp_path), scenario, decode=recording_decode, max_delay_s=0, threads=2, torch_threads=1)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


# -- Classify's forward module (--optimize) ------------------------------------------------------


def _served_cnn(path) -> ServedModel:
    return ServedModel.create(modelfile.load_model(path), max_pixels=1 << 20)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 128, 128), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_optimize_on_serves_a_frozen_copy_with_the_same_logits_and_probes_keep_the_parameters(cnn_model_file):
    from bitmoji.core.gradients import gradient_probe

    plain = _served_cnn(cnn_model_file)
    fast, why = plain.optimized(8, "on")
    assert (
        why.startswith("optimized (--optimize on") and fast.forward_module is not None and plain.forward_module is None
    )
    assert not list(fast.forward_module.parameters())  # frozen: weights are constants now
    batch = _images(5)
    want, got = torch.tensor(plain.predict(batch)), torch.tensor(fast.predict(batch))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # GradientProbe runs the module as loaded: still every parameter, still its gradients
    assert fast.module is plain.module and len(list(fast.module.parameters())) == len(list(plain.module.parameters()))
    result = gradient_probe(fast.module, fast.to_device(batch[:1]), torch.tensor([1.0]))
    assert all(p.norm > 0 for p in result.parameters if p.name.endswith("weight"))


def test_optimize_auto_keeps_whichever_module_it_picks_exact(cnn_model_file):
    plain = _served_cnn(cnn_model_file)
    chosen, why = plain.optimized(4, "auto")
    assert why.startswith(("optimized (", "as loaded (the optimized copy does not pay: ")), why
    assert " ms optimized vs " in why and " ms as loaded at batch 4, " in why, why  # says which number is which
    assert (chosen.forward_module is not None) == why.startswith("optimized")
    batch = _images(3, seed=2)
    torch.testing.assert_close(
        torch.tensor(chosen.predict(batch)), torch.tensor(plain.predict(batch)), atol=1e-4, rtol=1e-4
    )


def test_optimize_off_or_no_declared_shape_keeps_the_module_as_loaded(cnn_model_file, tmp_path):
    plain = _served_cnn(cnn_model_file)
    assert plain.optimized(4, "off") == (plain, "as loaded (--optimize off)")
    shapeless = served(tmp_path)  # SumNet's file declares no input shape
    same, why = shapeless.optimized(4, "on")
    assert same is shapeless and "declares its input shape" in why
    with pytest.raises(ValueError, match="optimize mode 'fast'"):
        plain.optimized(4, "fast")


def test_an_optimized_copy_that_answers_differently_or_cannot_be_made_is_not_served(
    cnn_model_file, tmp_path, monkeypatch
):
    import bitmoji.server.model

    plain = _served_cnn(cnn_model_file)
    other = modelfile.load_model(
        export_test_model("cnn", tmp_path / "other.pt", seed=7)
    ).module  # other weights: other logits
    monkeypatch.setattr(bitmoji.server.model, "optimize_for_inference", lambda module: other)
    same, why = plain.optimized(4, "on")
    assert same is plain and why.startswith("as loaded (the optimized copy's logits differ by up to")

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the copy breaks at run time")

    monkeypatch.setattr(bitmoji.server.model, "optimize_for_inference", lambda module: modelfile.script(Broken()))
    same, why = plain.optimized(4, "on")
    assert same is plain and why.startswith("as loaded (the optimized copy failed:") and "breaks at run time" in why

    def cannot(module):
        raise RuntimeError("freezing failed")

    monkeypatch.setattr(bitmoji.server.model, "optimize_for_inference", cannot)
    same, why = plain.optimized(4, "on")
    assert same is plain and why.startswith("as loaded (could not optimize: RuntimeError")
