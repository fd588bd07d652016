"""The server's parts in-process (no subprocess, no gRPC): configuration, and the batcher's timing,
grouping and ordering rules with a real model on the real model thread.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from torch import nn

from server.batcher import Batcher, QueueFull
from server.config import ServerConfig, parse_config
from server.metrics import Metrics
from server.model import ServedModel
from trainer import modelfile

# -- configuration ----------------------------------------------------------------


def test_flags_environment_and_defaults():
    env = {"BITMOJI_MODEL": "m.pt", "BITMOJI_MAX_BATCH_SIZE": "8", "BITMOJI_MAX_BATCH_DELAY_MS": "0.5", "BITMOJI_DISABLE_GRADIENT_PROBE": "1"}
    config = parse_config([], environ=env)
    assert (config.model, config.max_batch_size, config.max_batch_delay_ms, config.gradient_probe) == ("m.pt", 8, 0.5, False)
    assert config.port == 50051 and config.metrics_port == 9464 and config.host == "127.0.0.1"
    config = parse_config(["--model", "x.pt", "--max-batch-size", "16", "--input-shape", "3,64,64"], environ=env)
    assert (config.model, config.max_batch_size, config.input_shape) == ("x.pt", 16, (3, 64, 64))  # flags win
    assert parse_config(["--model", "x.pt", "--disable-gradient-probe"], environ={}).gradient_probe is False
    assert parse_config(["--model", "x.pt"], environ={}).gradient_probe is True


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--max-queue", "10", "--max-items-per-call", "20"], {}),  # a call could never fit the queue
        (["--max-batch-size", "0"], {}),
        ([], {"BITMOJI_MAX_BATCH_SIZE": "lots"}),
        (["--device", "tpu"], {}),
        (["--log-level", "chatty"], {}),
    ],
)
def test_bad_configuration_is_refused_with_usage(argv, env, capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(["--model", "m.pt", *argv], environ=env)
    assert info.value.code == 2
    assert "bitmoji-serve: error:" in capsys.readouterr().err


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ServerConfig(model="m.pt").max_batch_size = 3


# -- the batcher ------------------------------------------------------------------


class SumNet(nn.Module):
    """Any item shape -> one logit per item: the sum of its values times `scale`."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1, keepdim=True) * self.scale


def served(tmp_path, scale: float = 1.0) -> ServedModel:
    path = modelfile.export_torchscript(SumNet(scale), tmp_path / f"sum{scale}.pt", {"model_version": f"sum-{scale}"}, torch.ones(2, 3))
    return ServedModel.create(modelfile.load_model(path), max_pixels=1 << 20)


def run_batcher(model: ServedModel, scenario, **settings):
    """Run `scenario(batcher)` on a started batcher; returns (its result, the batcher's metrics)."""
    metrics = Metrics()
    options = {"max_batch_size": 32, "max_delay_s": 0.3, "max_queue": 64, **settings}

    async def main():
        batcher = Batcher(model, metrics=metrics, **options)
        batcher.start()
        try:
            return await asyncio.wait_for(scenario(batcher), 10)
        finally:
            batcher.close(timeout=5)

    return asyncio.run(main()), metrics


def items(*values, shape=(2,)):
    return [torch.full(shape, float(v)) for v in values]


def logits(results):
    return [round(logit, 4) for logit, _probability in results]


def test_a_lonely_caller_does_not_wait(tmp_path):
    async def scenario(batcher):
        batcher.admit(1)
        started = time.monotonic()
        results, version = await batcher.run(items(1), arrived=started)
        return time.monotonic() - started, results, version

    (elapsed, results, version), _ = run_batcher(served(tmp_path), scenario, max_delay_s=1.0)
    assert logits(results) == [2.0] and version == "sum-1.0"
    assert elapsed < 0.2, f"waited {elapsed:.3f}s with nobody else around"


def test_a_batch_waits_for_items_on_their_way_at_most_the_delay_from_its_first_arrival(tmp_path):
    async def scenario(batcher):
        batcher.admit(1)
        batcher.admit(1)  # a second call being "preprocessed" that never comes
        started = time.monotonic()
        await batcher.run(items(1), arrived=started)
        full_wait = time.monotonic() - started
        batcher.admit(1)
        started = time.monotonic()
        await batcher.run(items(1), arrived=started - 0.25)  # arrived 0.25 s ago: only 0.05 s of the delay left
        late_wait = time.monotonic() - started
        batcher.withdraw(1)
        return full_wait, late_wait

    (full_wait, late_wait), _ = run_batcher(served(tmp_path), scenario, max_delay_s=0.3)
    assert 0.25 <= full_wait < 0.6
    assert late_wait < 0.2, f"the delay was counted from when the model thread polled ({late_wait:.3f}s)"


def test_concurrent_calls_share_a_batch_and_each_gets_its_own_results_in_order(tmp_path):
    async def scenario(batcher):
        batcher.admit(3)
        batcher.admit(2)
        now = time.monotonic()
        first = asyncio.ensure_future(batcher.run(items(1, 2, 3), arrived=now))
        await asyncio.sleep(0.02)
        second = await batcher.run(items(10, 20), arrived=now)
        return await first, second

    ((first, _), (second, _)), metrics = run_batcher(served(tmp_path), scenario)
    assert logits(first) == [2.0, 4.0, 6.0] and logits(second) == [20.0, 40.0]
    assert metrics.registry.get_sample_value("bitmoji_batch_size_count") == 1
    assert metrics.registry.get_sample_value("bitmoji_batch_size_sum") == 5


def test_a_big_call_is_split_into_batches_and_items_of_other_shapes_never_share_one(tmp_path):
    async def scenario(batcher):
        tensors = items(1, 2, 3, 4, 5) + items(1, shape=(3,)) + items(6)
        batcher.admit(len(tensors))
        return await batcher.run(tensors, arrived=time.monotonic())

    (results, _), metrics = run_batcher(served(tmp_path), scenario, max_batch_size=4)
    assert logits(results) == [2.0, 4.0, 6.0, 8.0, 10.0, 3.0, 12.0]
    sizes = metrics.registry.get_sample_value("bitmoji_batch_size_sum"), metrics.registry.get_sample_value("bitmoji_batch_size_count")
    assert sizes == (7, 3)  # [1 2 3 4] [5 6] and the one of shape (3,)


def test_the_queue_is_bounded_and_withdrawn_items_free_it(tmp_path):
    async def scenario(batcher):
        batcher.admit(4)
        with pytest.raises(QueueFull, match="queue full"):
            batcher.admit(1)
        batcher.withdraw(4)
        batcher.admit(4)
        return (await batcher.run(items(1, 2, 3, 4), arrived=time.monotonic()))[0]

    results, metrics = run_batcher(served(tmp_path), scenario, max_queue=4)
    assert logits(results) == [2.0, 4.0, 6.0, 8.0]
    assert metrics.registry.get_sample_value("bitmoji_queue_depth") == 0


def test_swap_model_serves_the_new_model_from_the_next_batch(tmp_path):
    new = served(tmp_path, scale=10.0)

    async def scenario(batcher):
        batcher.admit(1)
        before = await batcher.run(items(1), arrived=time.monotonic())
        old = batcher.swap_model(new)
        batcher.admit(1)
        after = await batcher.run(items(1), arrived=time.monotonic())
        return before, after, old.version

    ((before, v1), (after, v2), old), _ = run_batcher(served(tmp_path), scenario)
    assert (logits(before), v1, old) == ([2.0], "sum-1.0", "sum-1.0")
    assert (logits(after), v2) == ([20.0], "sum-10.0")
