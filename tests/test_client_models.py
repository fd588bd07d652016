"""Model names and versions on every call, and the ModelRepository management calls and commands, against an
in-process grpc.aio server that implements the new proto (tests/helpers.py)."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import pytest
from helpers import FakeRepository
from helpers import serve_fakes as serve

from bitmoji.client import (
    AsyncBitmojiClient,
    BitmojiClient,
    BitmojiError,
    ModelList,
    ModelStatus,
    ModelVersionStatus,
    cli,
)


@pytest.fixture
def fake():
    server, classifier = serve()
    yield server, classifier
    server.stop()


def routed(classifier) -> list[tuple[str, str]]:
    return [(r.model_name, r.model_version) for r in classifier.requests]


# --- every call names a model and a version ------------------------------------------------


def test_calls_name_the_clients_model_and_version_unless_they_name_their_own(fake):
    server, classifier = fake
    with BitmojiClient(server.target) as client:
        (p,) = client.classify(b"png")  # nothing named: the server's defaults answer, and say which
        assert (p.model_name, p.model_version, p.model_build) == ("cnn", "2", "b2")
    with BitmojiClient(server.target, model="cnn", version="1") as client:
        client.classify(b"png")
        client.classify(b"png", version=2)  # a number is a version too
        client.classify(b"png", model="mlp")  # another model: its own default version, not ours
        client.classify(b"png", model="mlp", version="1")
        client.classify(b"png", model="cnn")  # our model: our version
        client.classify(b"png", model="", version="")  # explicitly the server's defaults
        list(client.classify_stream([[b"png"]], version="2"))
        probe = client.gradient_probe([b"png"], [1.0], model="mlp")
        info = client.model_info(version="2")
    assert routed(classifier)[1:] == [
        ("cnn", "1"),
        ("cnn", "2"),
        ("mlp", ""),
        ("mlp", "1"),
        ("cnn", "1"),
        ("", ""),
        ("cnn", "2"),
        ("mlp", ""),
        ("cnn", "2"),
    ]
    assert (probe.model_name, probe.model_version, probe.model_build) == ("mlp", "1", "b1")
    assert (info.model_name, info.model_version, info.model_build) == ("cnn", "2", "b2")


def test_model_info_carries_every_version_and_the_routing(fake):
    server, _ = fake
    with BitmojiClient(server.target) as client:
        info = client.model_info()
    assert info.status == ModelStatus(
        name="cnn",
        versions=(
            ModelVersionStatus("1", "READY", "", "b1", "cnn", 50 * 2**20),
            ModelVersionStatus("2", "READY", "", "b2", "cnn", 50 * 2**20),
            ModelVersionStatus("3", "UNAVAILABLE", "not loaded"),
        ),
        default_version="2",
    )
    assert info.status.version("3").reason == "not loaded"
    with pytest.raises(KeyError, match="no version '9' \\(versions: 1, 2, 3\\)"):
        info.status.version("9")


def test_probe_tensors_come_back_in_the_type_asked_for(fake):
    server, _ = fake
    with BitmojiClient(server.target) as client:
        as_lists = client.gradient_probe([b"png", b"png"], [1.0, 0.0], values=True, tensor_type="list")
        as_numpy = client.gradient_probe([b"png"], [1.0], values=True, tensor_type="numpy")
        with pytest.raises(ValueError, match="tensor_type must be one of"):
            client.gradient_probe([b"png"], [1.0], tensor_type="jax")
    assert as_lists.outputs == [[1.0], [1.0]] and as_lists.parameters["w"].values == [[2.0, 2.0], [2.0, 2.0]]
    assert as_lists.input_gradients == [[1, 2, 3], [1, 2, 3]]
    assert as_numpy.outputs.shape == (1, 1) and as_numpy.input_gradients[0].tolist() == [1, 2, 3]


# --- the repository --------------------------------------------------------------------------


def test_management_calls_return_readable_statuses(fake):
    server, _ = fake
    with BitmojiClient(server.target) as client:
        models = client.list_models()
        assert isinstance(models, ModelList) and [m.name for m in models] == ["cnn", "mlp"] and len(models) == 2
        assert models.default_model == "cnn" and models["mlp"].default_version == "1"
        with pytest.raises(KeyError, match="no model named 'gan' \\(models: cnn, mlp\\)"):
            models["gan"]

        loaded = client.load_model("cnn", ["3"])
        assert loaded.version("3").state == "READY" and loaded.default_version == "3"  # unpinned: the highest
        failed = client.load_model("cnn", "bad")  # one version may be given bare
        assert failed.version("bad").state == "FAILED" and "not a TorchScript file" in failed.version("bad").reason

        promoted = client.set_default_version("cnn", "2")
        assert (promoted.default_version, promoted.default_pinned, promoted.previous_default_version) == (
            "2",
            True,
            "3",
        )
        traffic = client.set_traffic("cnn", canary_version="3", canary_weight=0.25, shadow_version="1")
        assert (traffic.canary_version, traffic.canary_weight, traffic.shadow_version) == ("3", 0.25, "1")
        unpinned = client.set_default_version("cnn", None)
        assert not unpinned.default_pinned and unpinned.default_version == "3"

        unloaded = client.unload_model("cnn", ["1", "3"])
        assert [v.state for v in unloaded.versions] == ["UNAVAILABLE", "READY", "UNAVAILABLE", "FAILED"]
        assert client.list_models(ready_only=True).models[0].name == "cnn"

        with pytest.raises(BitmojiError) as info:
            client.set_default_version("cnn", "1")  # not READY: the server's answer, raised as it is
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and info.value.method == "SetDefaultVersion"
        with pytest.raises(ValueError, match="canary_weight must be in \\[0, 1\\]"):
            client.set_traffic("cnn", "2", 1.5)
        with pytest.raises(ValueError, match="needs a canary_version"):
            client.set_traffic("cnn", "", 0.5)
        with pytest.raises(ValueError, match="a model name is needed"):
            client.load_model("")


def test_the_management_token_goes_only_to_the_repository():
    repository = FakeRepository(token="admin")
    server, classifier = serve(repository=repository)
    try:
        with BitmojiClient(server.target, token="user", management_token="admin") as client:
            client.classify(b"png")
            client.list_models()
        assert classifier.metadata[-1]["authorization"] == "Bearer user"
        assert repository.metadata[-1]["authorization"] == "Bearer admin"
        with BitmojiClient(server.target, token="admin") as client:  # no management token: the token serves both
            client.list_models()
        with BitmojiClient(server.target, token="user") as client:
            with pytest.raises(BitmojiError) as info:
                client.list_models()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def test_async_client_names_models_and_manages_them(fake):
    server, classifier = fake

    async def main():
        async with AsyncBitmojiClient(server.target, model="mlp") as client:
            predictions = await client.classify(b"png")
            streamed = [p async for p in client.classify_stream([[b"png"]], model="cnn", version="1")]
            probe = await client.gradient_probe([b"png"], [1.0], tensor_type="list")
            info = await client.model_info()
            models = await client.list_models()
            loaded = await client.load_model("cnn", ["3"])
            promoted = await client.set_default_version("cnn", "3")
            traffic = await client.set_traffic("cnn", "2", 0.1)
            unloaded = await client.unload_model("mlp")
            return predictions, streamed, probe, info, models, loaded, promoted, traffic, unloaded

    predictions, streamed, probe, info, models, loaded, promoted, traffic, unloaded = asyncio.run(main())
    assert predictions[0].model_name == "mlp" and streamed[0][0].model_version == "1"
    assert probe.outputs == [[1.0]] and info.model_name == "mlp" and info.status.name == "mlp"
    assert len(models) == 2 and loaded.version("3").state == "READY" and promoted.default_pinned
    assert traffic.canary_version == "2" and [v.state for v in unloaded.versions] == ["UNAVAILABLE"]
    assert routed(classifier)[:2] == [("mlp", ""), ("cnn", "1")]


# --- the command line ------------------------------------------------------------------------


def run(capsys, target: str, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--target", target, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_models_shows_every_version_with_its_state_and_routing(fake, capsys):
    server, _ = fake
    with BitmojiClient(server.target) as client:
        client.set_traffic("cnn", canary_version="1", canary_weight=0.1)
    code, out, err = run(capsys, server.target, "models")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["model", "version", "state", "routing", "build", "memory", "reason"]
    assert re.match(r"cnn +1 +READY +canary 10% +b1 +50 MiB +-$", lines[1])
    assert re.match(r"cnn +2 +READY +default +b2 ", lines[2])
    assert re.match(r"cnn +3 +UNAVAILABLE +- +- +- +not loaded$", lines[3])
    assert re.match(r"mlp +1 +READY +default +b1", lines[4])
    assert "cnn: canary 1 (10%)" in lines and lines[-1] == "default model: cnn"
    assert len({line.index("READY") for line in lines[1:5] if "READY" in line}) == 1  # one column

    code, out, _ = run(capsys, server.target, "--json", "models")
    listed = json.loads(out)
    assert listed["default_model"] == "cnn" and listed["models"][0]["versions"][2]["state"] == "UNAVAILABLE"


def test_cli_load_unload_promote_and_rollback(fake, capsys, monkeypatch):
    server, _ = fake
    code, out, err = run(capsys, server.target, "load", "cnn", "--version", "3")
    assert code == 0 and err == "" and out.startswith("model cnn:")
    assert re.search(r"^  3 +READY +default +b3", out, re.M) and re.search(r"^  default: +3$", out, re.M)

    code, out, err = run(capsys, server.target, "load", "cnn", "--version", "bad")
    assert code == 1 and err == "bitmoji-client: cnn version bad failed to load: bad.pt: not a TorchScript file\n"

    code, out, _ = run(capsys, server.target, "promote", "cnn", "2")
    assert code == 0 and re.search(r"^  default: +2 \(pinned\); before: 3$", out, re.M)
    code, out, _ = run(capsys, server.target, "rollback", "cnn")  # to the previous default
    assert code == 0 and re.search(r"^  default: +3 \(pinned\); before: 2$", out, re.M)
    code, out, _ = run(capsys, server.target, "rollback", "cnn", "1")
    assert code == 0 and re.search(r"^  default: +1 \(pinned\)", out, re.M)

    code, out, _ = run(capsys, server.target, "unload", "cnn", "--version", "2", "--version", "3")
    assert code == 0 and re.search(r"^  2 +UNAVAILABLE .*unloaded$", out, re.M)

    code, _, err = run(capsys, server.target, "rollback", "mlp")
    assert code == 1 and "mlp has no previous default version to roll back to; name one" in err
    code, _, err = run(capsys, server.target, "promote", "gan", "1")
    assert code == 1 and err.startswith("bitmoji-client: promote failed: NOT_FOUND: no model named 'gan'")
    assert err.count("\n") == 1


def test_cli_traffic_changes_what_it_names_and_keeps_the_rest(fake, capsys):
    server, _ = fake
    code, out, _ = run(capsys, server.target, "traffic", "cnn", "--canary", "1", "--weight", "0.2")
    assert code == 0 and re.search(r"^  canary: +1 \(20% of the calls naming no version\)$", out, re.M)
    code, out, _ = run(capsys, server.target, "traffic", "cnn", "--shadow", "1")  # keeps the canary
    assert re.search(r"^  canary: +1 \(20%", out, re.M) and re.search(r"^  shadow: +1$", out, re.M)
    code, out, _ = run(capsys, server.target, "traffic", "cnn", "--weight", "0.5")  # reweighs it
    assert re.search(r"^  canary: +1 \(50%", out, re.M)
    code, out, _ = run(capsys, server.target, "traffic", "cnn")  # only shows
    assert (
        code == 0
        and re.search(r"^  canary: +1 \(50%", out, re.M)
        and re.search(r"^  1 +READY +canary 50%, shadow", out, re.M)
    )
    code, out, _ = run(capsys, server.target, "traffic", "cnn", "--clear")
    assert re.search(r"^  canary: +-$", out, re.M) and re.search(r"^  shadow: +-$", out, re.M)

    code, _, err = run(capsys, server.target, "traffic", "cnn", "--canary", "1")
    assert code == 1 and "--canary needs --weight" in err
    code, _, err = run(capsys, server.target, "traffic", "cnn", "--weight", "0.3")
    assert code == 1 and "cnn has no canary to weigh" in err
    code, _, err = run(capsys, server.target, "traffic", "cnn", "--canary", "1", "--weight", "2")
    assert code == 1 and "--weight must be in [0, 1]" in err
    code, _, err = run(capsys, server.target, "traffic", "gan")
    assert code == 1 and "no model named 'gan'" in err


def test_cli_model_options_and_the_management_token(capsys, monkeypatch):
    repository = FakeRepository(token="admin")
    server, classifier = serve(repository=repository)
    try:
        monkeypatch.setenv("BITMOJI_TOKEN", "user")
        code, _, err = run(capsys, server.target, "models")
        assert code == 1 and "UNAUTHENTICATED" in err
        monkeypatch.setenv("BITMOJI_MANAGEMENT_TOKEN", "admin")
        assert run(capsys, server.target, "models")[0] == 0
        assert repository.metadata[-1]["authorization"] == "Bearer admin"

        code, out, _ = run(capsys, server.target, "--model", "mlp", "--model-version", "1", "info")
        assert code == 0 and re.search(r"^model name: +mlp$", out, re.M)
        assert classifier.requests[-1].model_name == "mlp" and classifier.requests[-1].model_version == "1"
        assert classifier.metadata[-1]["authorization"] == "Bearer user"
    finally:
        server.stop()


def test_cli_info_shows_nested_metadata_and_the_versions(fake, capsys):
    server, _ = fake
    with BitmojiClient(server.target) as client:
        client.set_default_version("cnn", "2")
        client.set_traffic("cnn", "1", 0.05, "1")
    code, out, _ = run(capsys, server.target, "info")
    assert code == 0 and not re.search(r"[{}\[\]]", out)  # no Python dicts or lists
    assert re.search(r"^  metrics\.by_class\.eva: +0\.8$", out, re.M)
    assert re.search(r"^  input\.shape: +3, 128, 128$", out, re.M)
    section = out.split("versions of cnn:\n")[1].splitlines()
    assert section[0].split() == ["version", "state", "build", "reason"]
    assert re.match(r"  3 +UNAVAILABLE +- +not loaded$", section[3])
    assert re.search(r"^  default: +2 \(pinned\); before: 2$", out, re.M)
    assert re.search(r"^  canary: +1 \(5% of the calls naming no version\)$", out, re.M)
    assert re.search(r"^  shadow: +1$", out, re.M)


def test_cli_classify_names_a_refused_file_across_chunks(fake, capsys, tmp_path, monkeypatch):
    server, classifier = fake
    files = []
    for name, data in [("a.png", b"png"), ("b.png", b"png"), ("c.png", b"png"), ("bad.png", b"bad"), ("e.png", b"png")]:
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    monkeypatch.setattr(cli, "CLASSIFY_CHUNK", 2)  # bad.png is inputs[1] of the second call
    code, out, err = run(capsys, server.target, "--model", "mlp", "classify", *files)
    assert code == 1 and err == f"bitmoji-client: {files[3]}: not an image Pillow can read\n"
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == [files[0], files[1], files[2], files[4]]
    assert out.splitlines()[-1] == "model: mlp  version: 1  build: b1"
    assert [len(r.inputs) for r in classifier.requests] == [2, 2, 1, 1]  # the second call sent again without it
