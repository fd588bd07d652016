"""The engine and the model manager in-process, on real (tiny) TorchScript models in a real repository folder.

No gRPC and no subprocess: `Engine.infer`, `probe` and `model_info`, the
manager's loads, unloads, reloads and routing (default, pinned, canary,
shadow), exactly as the servicers call them. The models are FaultyNet
(tests/helpers.py): raw tensors [2], the logit is column 0 times the model's
scale (-1 flips every label), column 1 makes the forward pass spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import export_faulty_model

from bitmoji.core.modelfile import export_torchscript
from bitmoji.server.config import ServerConfig
from bitmoji.server.engine import Engine
from bitmoji.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from bitmoji.server.inputs import RawTensor
from bitmoji.server.metrics import Metrics
from bitmoji.server.models import ModelManager, State


def item(logit: float, work: float = 0.0) -> RawTensor:
    return RawTensor("float32", (2,), torch.tensor([logit, work], dtype=torch.float32).numpy().tobytes())


def repository(root, versions: dict[str, dict[int, float]], configs: dict[str, dict] | None = None):
    """{"model": {version: scale}} -> FaultyNet files (build "model-v<version>"), and config.json files."""
    for name, scales in versions.items():
        for version, scale in scales.items():
            export_faulty_model(
                root / name / str(version) / "model.pt", f"{name}-v{version}", scale=scale, classes=True
            )
    for name, config in (configs or {}).items():
        (root / name / "config.json").write_text(json.dumps(config))
    return root


@contextlib.asynccontextmanager
async def running(root, **overrides):
    """A started manager and engine over `root` (no gRPC); stopped on exit."""
    settings = dict(
        model_repository=str(root), max_batch_delay_ms=0.0, decode_workers=1, torch_threads=1, optimize="off"
    )
    config = ServerConfig(**{**settings, **overrides})
    metrics = Metrics()
    manager = ModelManager(config, metrics, torch.device("cpu"), torch_threads=1)
    pool = ThreadPoolExecutor(1)
    engine = Engine(config, manager, metrics, probe_pool=pool, torch_threads=1)
    await manager.start()
    engine.serving = True
    try:
        yield engine
    finally:
        await manager.stop_background()
        await asyncio.to_thread(manager.close, 5)
        pool.shutdown()


def value(engine: Engine, name: str, **labels) -> float:
    return engine._metrics.registry.get_sample_value(name, labels) or 0.0


async def until(condition, timeout: float = 30.0) -> None:
    """Poll `condition` every millisecond (no fixed sleeps: a loaded machine only makes it take longer)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def states(engine: Engine, model: str) -> dict[int, State]:
    return {v.version: v.state for v in engine.manager.status(model).versions}


def test_calls_name_a_model_and_a_version_or_get_the_defaults(tmp_path):
    root = repository(tmp_path, {"cnn": {1: 1.0, 2: 2.0}, "mlp": {1: 3.0}}, {"cnn": {"version_policy": {"all": {}}}})

    async def main():
        async with running(root, default_model="cnn") as engine:
            default = await engine.infer([item(0.5), item(-0.25)])
            assert (default.model, default.version, default.served.build) == ("cnn", "2", "cnn-v2")  # highest READY
            assert [round(z, 4) for z, _p in default.results] == [1.0, -0.5]
            assert (await engine.infer([item(0.5)], version="1")).results[0][0] == pytest.approx(0.5)
            named = await engine.infer([item(0.5)], model="mlp")
            assert (named.model, named.version, named.results[0][0]) == ("mlp", "1", pytest.approx(1.5))
            for model, version, message in (
                ("nope", "", "unknown model 'nope'; available: cnn (versions 1, 2), mlp (version 1)"),
                ("cnn", "3", "model 'cnn' has no READY version '3'; READY: 1, 2"),
                ("cnn", "x", "has no READY version 'x'"),
            ):
                with pytest.raises(NotFound, match=message.replace("(", r"\(").replace(")", r"\)")):
                    await engine.infer([item(0.5)], model=model, version=version)
            with pytest.raises(InvalidArgument, match="empty request"):
                await engine.infer([])
            info = engine.model_info("cnn", "1")
            assert (info.loaded.label, info.status.default_version) == ("1", 2)
            assert engine.is_ready("cnn", "1") and not engine.is_ready("cnn", "3") and engine.is_ready()

    asyncio.run(main())


def test_without_a_default_model_a_call_must_name_one(tmp_path):
    root = repository(tmp_path, {"cnn": {1: 1.0}, "mlp": {1: 1.0}})

    async def main():
        async with running(root) as engine:
            with pytest.raises(NotFound, match="no default model: name one"):
                await engine.infer([item(1.0)])
            assert (await engine.infer([item(1.0)], model="mlp")).model == "mlp"

    asyncio.run(main())


def test_a_pinned_default_is_promoted_and_rolled_back(tmp_path):
    root = repository(
        tmp_path, {"cnn": {1: 1.0, 2: 2.0}}, {"cnn": {"version_policy": {"all": {}}, "default_version": 1}}
    )

    async def main():
        async with running(root) as engine:
            manager = engine.manager
            assert (await engine.infer([item(1.0)])).version == "1"  # pinned by config.json, not the highest
            status = manager.set_default_version("cnn", "2")  # promote
            assert (status.default_version, status.pinned, status.previous_default) == (2, True, 1)
            assert (await engine.infer([item(1.0)])).version == "2"
            manager.set_default_version("cnn", str(status.previous_default))  # roll back
            assert (await engine.infer([item(1.0)])).version == "1"
            with pytest.raises(NotFound):
                manager.set_default_version("cnn", "9")
            assert manager.set_default_version("cnn", "").default_version == 2  # unpinned: the highest READY

    asyncio.run(main())


def test_a_canary_takes_its_share_of_calls_that_name_no_version(tmp_path):
    root = repository(
        tmp_path, {"cnn": {1: 1.0, 2: 1.0}}, {"cnn": {"version_policy": {"all": {}}, "default_version": 1}}
    )

    async def main():
        async with running(root) as engine:
            engine.manager.set_traffic("cnn", "2", 0.25, "")
            answered = [(await engine.infer([item(1.0)])).version for _ in range(800)]
            share = answered.count("2") / len(answered)
            assert 0.25 - 0.06 < share < 0.25 + 0.06, share  # 800 draws: sd 0.015, so 4 sd either way
            assert {(await engine.infer([item(1.0)], version="1")).version for _ in range(20)} == {
                "1"
            }  # named: no canary
            assert engine.model_info("cnn").loaded.label == "1"  # info and probes mean the default, never the canary
            for bad, message in (("1", "is the default version"), ("9", "has no version 9")):
                with pytest.raises((InvalidArgument, NotFound), match=message):
                    engine.manager.set_traffic("cnn", bad, 0.5, "")
            with pytest.raises(InvalidArgument, match=r"\[0, 1\]"):
                engine.manager.set_traffic("cnn", "2", 1.5, "")
            assert engine.manager.set_traffic("cnn", "", 0.0, "").canary_version is None

    asyncio.run(main())


def test_a_shadow_sees_the_same_items_off_the_callers_path_and_its_disagreements_are_counted(tmp_path):
    # version 2 flips every label: each shadowed item disagrees, its logit differs by 2 x |logit|
    root = repository(
        tmp_path, {"cnn": {1: 1.0, 2: -1.0}}, {"cnn": {"version_policy": {"all": {}}, "default_version": 1}}
    )

    async def main():
        async with running(root) as engine:
            engine.manager.set_traffic("cnn", "", 0.0, "2")
            labels = {"model": "cnn", "version": "1", "shadow_version": "2"}
            for _ in range(5):
                result = await engine.infer([item(0.75), item(-0.5)])
                assert result.version == "1" and [round(z, 4) for z, _ in result.results] == [
                    0.75,
                    -0.5,
                ]  # not the shadow's
            deadline = time.monotonic() + 10
            while value(engine, "bitmoji_shadow_comparisons_total", **labels) < 10:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert value(engine, "bitmoji_shadow_disagreements_total", **labels) == 10
            assert value(engine, "bitmoji_shadow_logit_difference_count", **labels) == 10
            assert value(engine, "bitmoji_shadow_logit_difference_sum", **labels) == pytest.approx(5 * (1.5 + 1.0))
            # the default's own items were all answered by version 1 only
            assert value(engine, "bitmoji_items_total", model="cnn", version="2") == 10  # the shadow's runs
            engine.manager.set_default_version("cnn", "2")  # promoting the shadow ends the shadow
            assert engine.manager.status("cnn").shadow_version is None

    asyncio.run(main())


def test_a_probe_runs_on_the_version_named_with_autograd(tmp_path):
    root = repository(tmp_path, {"cnn": {1: 1.0, 2: 3.0}}, {"cnn": {"version_policy": {"all": {}}}})

    async def main():
        async with running(root) as engine:
            outcome = await engine.probe([item(0.5)], [1.0], "bce", model="cnn", version="1")
            # d bce(z, 1) / d scale = (sigmoid(z) - 1) * x0, z = scale * x0
            z = torch.tensor(0.5)
            assert outcome.version == "1" and outcome.result.loss == pytest.approx(float(-torch.log(torch.sigmoid(z))))
            grad = dict((p.name, p.gradient) for p in outcome.result.parameters)["scale"]
            assert float(grad) == pytest.approx(float((torch.sigmoid(z) - 1) * 0.5), rel=1e-5)
            assert (await engine.probe([item(0.5)], [1.0])).version == "2"  # the default
            assert value(engine, "bitmoji_probes_total", model="cnn", version="1", loss="bce") == 1

    asyncio.run(main())


def test_a_version_that_fails_to_load_replaces_nothing_and_says_why(tmp_path):
    root = repository(tmp_path, {"cnn": {1: 1.0}}, {"cnn": {"version_policy": {"latest": {"num_versions": 1}}}})

    async def main():
        async with running(root, model_control_mode="poll", repository_poll_s=60) as engine:
            (root / "cnn" / "2").mkdir()
            (root / "cnn" / "2" / "model.pt").write_bytes(b"PK not a model")
            await engine.manager.poll()
            status = engine.manager.status("cnn")
            failed = {v.version: v for v in status.versions}[2]
            assert failed.state is State.FAILED and "not a loadable TorchScript file" in failed.reason
            assert status.default_version == 1 and (await engine.infer([item(1.0)])).version == "1"  # v1 serves on
            assert value(engine, "bitmoji_model_loads_total", model="cnn", result="failed") == 1
            await engine.manager.poll()  # the same broken file is not tried again
            assert value(engine, "bitmoji_model_loads_total", model="cnn", result="failed") == 1
            export_faulty_model(root / "cnn" / "2" / "model.pt", "cnn-v2b", scale=2.0, classes=True)  # fixed
            await engine.manager.poll()
            assert states(engine, "cnn") == {1: State.UNAVAILABLE, 2: State.READY}  # latest 1: v2 in, then v1 out
            assert (await engine.infer([item(1.0)])).version == "2"
            assert value(engine, "bitmoji_model_versions", model="cnn", state="READY") == 1

    asyncio.run(main())


def test_poll_loads_new_models_and_unloads_removed_ones(tmp_path):
    root = repository(tmp_path, {"cnn": {1: 1.0}})

    async def main():
        async with running(root, model_control_mode="poll", repository_poll_s=60) as engine:
            repository(root, {"mlp": {1: 2.0}})
            await engine.manager.poll()
            assert (await engine.infer([item(1.0)], model="mlp")).results[0][0] == pytest.approx(2.0)
            shutil.rmtree(root / "cnn")
            await engine.manager.poll()
            assert engine.manager.names() == ["mlp"]
            with pytest.raises(NotFound, match="unknown model 'cnn'"):
                await engine.infer([item(1.0)], model="cnn")
            # an unloaded version's series are gone: only loaded versions are label values
            assert value(engine, "bitmoji_queue_capacity", model="cnn", version="1") == 0

    asyncio.run(main())


def test_unloading_a_version_answers_the_calls_it_accepted_first(tmp_path):
    root = repository(tmp_path, {"cnn": {1: 1.0, 2: 2.0}}, {"cnn": {"version_policy": {"all": {}}}})
    iterations = 200000  # FaultyNet's loop: a good part of a second

    async def main():
        async with running(root, model_control_mode="explicit", load_model=("*",)) as engine:
            batcher = engine.manager.loaded("cnn", "1").batcher
            slow = asyncio.ensure_future(engine.infer([item(0.5, iterations)] * 4, version="1"))
            await until(lambda: batcher.queued or batcher._busy)  # accepted: queued or running
            unloading = asyncio.ensure_future(engine.manager.unload("cnn", ["1"]))
            await until(lambda: states(engine, "cnn")[1] is State.UNLOADING)
            assert not slow.done()
            status = await unloading
            assert slow.done(), "unloaded before the call it had accepted was answered"
            assert {v.version: v.state for v in status.versions} == {1: State.UNAVAILABLE, 2: State.READY}
            assert [round(z, 4) for z, _ in (await slow).results] == [0.5] * 4  # answered, not lost
            with pytest.raises(NotFound):
                await engine.infer([item(1.0)], version="1")
            status = await engine.manager.load("cnn", ["1"])  # and back
            assert {v.version: v.state for v in status.versions} == {1: State.READY, 2: State.READY}

    asyncio.run(main())


def test_loads_and_unloads_need_explicit_mode_and_respect_the_loaded_limit(tmp_path):
    root = repository(tmp_path, {"cnn": {1: 1.0}, "mlp": {1: 1.0}, "toy": {1: 1.0}})

    async def main():
        async with running(root) as engine:  # control mode none
            with pytest.raises(FailedPrecondition, match="--model-control-mode explicit"):
                await engine.manager.load("cnn")
        async with running(root, model_control_mode="explicit", load_model=("cnn",), max_loaded_models=2) as engine:
            assert (
                states(engine, "mlp") == {1: State.UNAVAILABLE}
                and "LoadModel" in engine.manager.status("mlp").versions[0].reason
            )
            await engine.manager.load("mlp")
            with pytest.raises(ResourceExhausted, match="--max-loaded-models 2"):
                await engine.manager.load("toy")
            assert states(engine, "toy") == {1: State.FAILED}
            await engine.manager.unload("mlp")
            assert states(engine, "mlp") == {1: State.UNAVAILABLE}
            await engine.manager.load("toy")
            assert states(engine, "toy") == {1: State.READY}
            memory = [v.memory_bytes for v in engine.manager.status("toy").versions]
            assert memory[0] >= 0

    asyncio.run(main())


def test_config_json_routing_changes_are_followed_on_poll(tmp_path):
    config = {"version_policy": {"all": {}}, "default_version": 1}
    root = repository(tmp_path, {"cnn": {1: 1.0, 2: 2.0}}, {"cnn": config})

    async def main():
        async with running(root, model_control_mode="poll", repository_poll_s=60) as engine:
            assert (await engine.infer([item(1.0)])).version == "1"
            (root / "cnn" / "config.json").write_text(json.dumps({**config, "default_version": 2, "shadow": 1}))
            await engine.manager.poll()
            status = engine.manager.status("cnn")
            assert (status.default_version, status.shadow_version) == (2, 1)
            assert (await engine.infer([item(1.0)])).version == "2"

    asyncio.run(main())


class _NoAutogradNet(torch.nn.Module):
    """Runs its forward pass without autograd, as a quantized or frozen module does: Classify works, a probe cannot."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return x[:, :1] * self.scale


def test_a_model_without_autograd_classifies_but_refuses_probes_with_failed_precondition(tmp_path):
    metadata = {"model_version": "nograd-1", "input": {"shape": [2]}, "class_names": ["eva", "not_eva"]}
    metadata["positive_class"] = "eva"
    export_torchscript(_NoAutogradNet(), tmp_path / "m" / "1" / "model.pt", metadata, torch.tensor([[0.5, 0.0]]))

    async def main():
        async with running(tmp_path) as engine:
            assert (await engine.infer([item(2.0)])).results[0][0] == pytest.approx(2.0)
            with pytest.raises(FailedPrecondition, match="nograd-1: .*GradientProbe needs a float model"):
                await engine.probe([item(0.5)], [1.0])

    asyncio.run(main())
