"""A model repository served by a real server: many models, many versions, roll-out under load.

The repository holds the lecture's toy network, the MLP and the CNN (two
versions that answer differently). Calls name a model and a version (or take
the defaults); a version dropped into the folder under `poll` becomes READY
and takes the calls that name no version, while load runs, with no failed
call; a corrupt version is refused and replaces nothing; unloading a version
under load loses no accepted call; tritonclient lists, loads and unloads;
the project's client and CLI promote and roll back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
import tritonclient.grpc as triton
from helpers import (
    ROOT,
    export_test_model,
    health_status,
    image_input,
    rpc_error,
    scrape,
    small_image,
    start_server,
    tensor_input,
    total,
    wait_until,
)

from bitmoji.client import BitmojiClient, BitmojiError
from bitmoji.core import modelfile
from bitmoji.trainer.models import ToyNetwork
from bitmoji.v1 import classifier_pb2 as pb
from bitmoji.v1 import classifier_pb2_grpc as pb_grpc

READY = pb.MODEL_STATE_READY


def make_repository(root):
    export_test_model("mlp", root / "mlp" / "1" / "model.pt", seed=0)
    export_test_model("cnn", root / "cnn" / "1" / "model.pt", seed=0)
    export_test_model("cnn", root / "cnn" / "2" / "model.pt", seed=1)
    (root / "cnn" / "config.json").write_text(json.dumps({"version_policy": {"all": {}}, "default_version": 1}))
    (root / "toy" / "1").mkdir(parents=True)
    modelfile.export_torchscript(ToyNetwork.lecture(), root / "toy" / "1" / "model.pt", {}, torch.tensor([[1.0]]))
    return root


def statuses(channel) -> dict[str, dict[str, int]]:
    listed = pb_grpc.ModelRepositoryStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
    return {m.name: {v.version: v.state for v in m.versions} for m in listed.models}


def classify(stub, model: str = "", version: str = "", image: bytes | None = None):
    request = pb.ClassifyRequest(
        inputs=[image_input(image or small_image(128))], model_name=model, model_version=version
    )
    return stub.Classify(request, timeout=30)


@pytest.fixture(scope="module")
def polled(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("repository"))
    server = start_server(
        None, "--model-repository", str(root), "--model-control-mode", "poll", "--repository-poll-s", "0.3",
        "--input-shape", "1", "--default-model", "mlp", timeout=120,
    )  # fmt: skip
    server.root = root
    yield server
    assert server.stop() == 0, server.output()


def test_calls_name_models_and_versions_and_unknown_ones_are_not_found(polled):
    with grpc.insecure_channel(polled.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert statuses(channel) == {"cnn": {"1": READY, "2": READY}, "mlp": {"1": READY}, "toy": {"1": READY}}
        default = classify(stub)
        assert (default.model_name, default.model_version) == ("mlp", "1")  # --default-model
        one, two = classify(stub, "cnn", "1"), classify(stub, "cnn", "2")
        assert (one.model_version, two.model_version) == ("1", "2")
        assert one.predictions[0].logit != pytest.approx(two.predictions[0].logit)  # two different models
        assert classify(stub, "cnn").model_version == "1"  # config.json pins version 1
        toy = stub.Classify(
            pb.ClassifyRequest(inputs=[tensor_input(torch.tensor([1.0]))], model_name="toy"), timeout=30
        )
        with torch.no_grad():
            assert toy.predictions[0].logit == pytest.approx(
                ToyNetwork.lecture()(torch.tensor([[1.0]])).item(), abs=1e-6
            )
        for model, version, words in (("nope", "", "unknown model 'nope'; available: cnn (versions 1, 2), mlp"),
                                      ("cnn", "3", "has no READY version '3'; READY: 1, 2"),
                                      ("../cnn", "", "unknown model '../cnn'")):  # fmt: skip
            error = rpc_error(classify, stub, model, version)
            assert error.code() == grpc.StatusCode.NOT_FOUND and words in error.details(), error.details()
        # health per model, and info about a named version
        assert health_status(channel, "bitmoji.v1.Classifier/cnn") == 1
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model_name="cnn", model_version="2"), timeout=30)
        assert (info.model_name, info.model_version, info.status.default_version) == ("cnn", "2", "1")
    samples = scrape(polled)
    memory = {
        (dict(items)["model"], dict(items)["version"]): value
        for (name, items), value in samples.items()
        if name == "bitmoji_model_memory_bytes"
    }
    for model, version in (("cnn", "1"), ("cnn", "2"), ("mlp", "1"), ("toy", "1")):
        assert total(samples, "bitmoji_model_info", model=model, version=version) == 1
        assert memory[model, version] >= 0  # a series per loaded version: the toy's few bytes can measure 0
    assert memory["mlp", "1"] > 20 * 2**20  # 6.3 M float32 weights cannot hide in memory already resident
    assert total(samples, "bitmoji_requests_total", method="Classify", code="OK", model="cnn", version="2") == 1


def test_a_new_version_rolls_out_under_load_and_a_corrupt_one_replaces_nothing(polled):
    root, stop, failures = polled.root, threading.Event(), []
    seen: list[list[str]] = [[] for _ in range(3)]  # per caller: its calls are in order

    def load(mine: list[str]):
        with grpc.insecure_channel(polled.target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            while not stop.is_set():
                try:
                    mine.append(classify(stub, "mlp").model_version)
                except grpc.RpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")

    callers = [threading.Thread(target=load, args=(mine,), daemon=True) for mine in seen]
    for caller in callers:
        caller.start()
    try:
        wait_until(polled, lambda s: all(len(mine) > 5 for mine in seen))
        staging = root / ".staging"
        export_test_model("mlp", staging / "model.pt", seed=2)
        staging.rename(root / "mlp" / "2")  # published atomically, as bitmoji-train publish does
        deadline = time.monotonic() + 60
        while not all(mine[-1] == "2" for mine in seen):
            assert time.monotonic() < deadline, "version 2 never served"
            time.sleep(0.05)
        (root / "mlp" / "3").mkdir()
        (root / "mlp" / "3" / "model.pt").write_bytes(b"PK\x03\x04 half a model")
        with grpc.insecure_channel(polled.target) as channel:
            while statuses(channel)["mlp"].get("3") != pb.MODEL_STATE_FAILED:
                assert time.monotonic() < deadline, statuses(channel)
                time.sleep(0.05)
            # latest 1: version 1 went once 2 was READY; 3 failed, so 2 serves on
            assert statuses(channel)["mlp"] == {"1": pb.MODEL_STATE_UNAVAILABLE, "2": READY, "3": pb.MODEL_STATE_FAILED}
        time.sleep(0.5)
    finally:
        stop.set()
        for caller in callers:
            caller.join(30)
    assert not failures, failures[:5]
    for mine in seen:  # each caller: 1 until 2 was ready, then 2, never back
        assert mine[0] == "1" and mine[-1] == "2" and mine == sorted(mine)
    assert "model mlp version 3 failed to load" in polled.output()
    shutil.rmtree(root / "mlp" / "3")


@pytest.fixture(scope="module")
def explicit(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("repository"))
    server = start_server(
        None, "--model-repository", str(root), "--model-control-mode", "explicit", "--load-model", "cnn,mlp",
        "--default-model", "cnn", timeout=120,
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.output()


def test_tritonclient_lists_loads_and_unloads(explicit):
    client = triton.InferenceServerClient(explicit.target)
    try:
        index = {(m["name"], m["version"]): m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert index[("toy", "1")]["state"] == "UNAVAILABLE" and index[("cnn", "2")]["state"] == "READY"
        assert not client.is_model_ready("toy")
        client.load_model("toy")  # answers once it is READY
        assert client.is_model_ready("toy") and client.is_model_ready("toy", "1")
        client.unload_model("toy")
        assert not client.is_model_ready("toy")
        assert "model_repository" in client.get_server_metadata(as_json=True)["extensions"]
    finally:
        client.close()


def test_unloading_a_version_under_load_loses_no_accepted_call(explicit):
    stop, answered, failures = threading.Event(), [], []

    def load():
        with BitmojiClient(explicit.target, model="cnn", timeout=30) as client:
            while not stop.is_set():
                try:
                    answered.append(client.classify([small_image(128)])[0].model_version)
                except BitmojiError as error:
                    failures.append(f"{error.code.name}: {error.details}")

    callers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for caller in callers:
        caller.start()
    try:
        with BitmojiClient(explicit.target) as admin:
            assert admin.set_default_version("cnn", "2").default_version == "2"  # promote
            while answered.count("2") < 20:
                time.sleep(0.02)
            status = admin.unload_model("cnn", ["2"])  # under load: its accepted calls finish first
            assert {v.version: v.state for v in status.versions}["2"] == "UNAVAILABLE"
            assert status.default_version == "1"  # the pinned version went: the highest READY one serves
            count = len(answered)
            while len(answered) < count + 20:
                time.sleep(0.02)
            admin.load_model("cnn", ["2"])
    finally:
        stop.set()
        for caller in callers:
            caller.join(30)
    assert not failures, failures[:5]
    assert "1" in answered and "2" in answered


def test_the_cli_lists_promotes_and_rolls_back(explicit):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "bitmoji.client", "--target", explicit.target, *args],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip

    listed = cli("models")
    assert listed.returncode == 0 and "cnn" in listed.stdout and "READY" in listed.stdout, listed.stderr
    assert cli("promote", "cnn", "1").returncode == 0
    assert cli("promote", "cnn", "2").returncode == 0
    rolled = cli("rollback", "cnn")
    assert rolled.returncode == 0, rolled.stderr
    with grpc.insecure_channel(explicit.target) as channel:
        assert classify(pb_grpc.ClassifierStub(channel), "cnn").model_version == "1"
    refused = cli("promote", "cnn", "9")
    assert refused.returncode == 1 and "NOT_FOUND" in refused.stderr
