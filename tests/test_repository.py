"""The model repository on disk (bitmoji.server.repository): layout, config.json, version policies. No torch."""

from __future__ import annotations

import json

import pytest

from bitmoji.server import config as server_config
from bitmoji.server.repository import ModelConfig, RepositoryError, VersionPolicy, check_name, parse_config, scan


def make(root, layout: dict) -> None:
    """{"name": {"1": b"...", "config.json": {...}}} -> files under root."""
    for name, entries in layout.items():
        for entry, content in entries.items():
            path = root / name / entry
            if entry == "config.json":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(content) if not isinstance(content, str) else content)
            else:
                path.mkdir(parents=True, exist_ok=True)
                if content is not None:
                    (path / "model.pt").write_bytes(content)


def test_scan_finds_models_and_integer_versions_and_ignores_the_rest(tmp_path):
    make(
        tmp_path,
        {"cnn": {"1": b"a", "2": b"b", "10": b"c", "01": b"x", "v3": b"x", ".tmp-9": b"x"}, "mlp": {"1": b"a"}},
    )
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README").write_text("not a model")
    models = scan(tmp_path)
    assert list(models) == ["cnn", "mlp"]
    assert list(models["cnn"].versions) == [1, 2, 10]  # ascending, numerically; "01", "v3", ".tmp-9" ignored
    assert models["cnn"].versions[10] == tmp_path / "cnn" / "10" / "model.pt"
    assert models["mlp"].config == ModelConfig() and not models["mlp"].config_error


def test_a_version_folder_without_its_file_is_listed_so_its_load_can_say_why(tmp_path):
    make(tmp_path, {"cnn": {"1": None}})
    assert list(scan(tmp_path)["cnn"].versions) == [1]


def test_no_such_repository_is_an_error(tmp_path):
    with pytest.raises(RepositoryError, match="no such model repository"):
        scan(tmp_path / "nope")


@pytest.mark.parametrize(
    "policy, available, selected",
    [
        (VersionPolicy(), [1, 2, 3], {3}),
        (VersionPolicy("latest", 2), [3, 1, 2], {2, 3}),
        (VersionPolicy("latest", 5), [1, 2], {1, 2}),
        (VersionPolicy("all"), [1, 4], {1, 4}),
        (VersionPolicy("specific", versions=(1, 3, 9)), [1, 2, 3], {1, 3}),
        (VersionPolicy(), [], set()),
    ],
)
def test_version_policies_select_as_tritons_do(policy, available, selected):
    assert policy.select(available) == selected


def test_config_json_sets_the_policy_routing_and_batching():
    config = parse_config(
        json.dumps(
            {
                "version_policy": {"latest": {"num_versions": 2}},
                "default_version": 1,
                "canary": {"version": 2, "weight": 0.25},
                "shadow": 3,
                "max_batch_size": 8,
                "max_batch_delay_ms": 0.5,
                "max_queue": 64,
                "model_threads": 1,
            }
        ),
        "cnn/config.json",
    )
    assert config.version_policy == VersionPolicy("latest", 2)
    assert (config.default_version, config.canary_version, config.canary_weight, config.shadow_version) == (
        1,
        2,
        0.25,
        3,
    )
    assert (config.max_batch_size, config.max_batch_delay_ms, config.max_queue, config.model_threads) == (8, 0.5, 64, 1)
    assert parse_config('{"version_policy": {"all": {}}}', "x").version_policy == VersionPolicy("all")
    assert parse_config('{"version_policy": {"specific": {"versions": [3, 1]}}}', "x").version_policy.versions == (1, 3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1]", "a JSON object"),
        ('{"max_batch_sise": 8}', "unknown keys ['max_batch_sise']"),
        ('{"max_batch_size": 0}', "max_batch_size must be at least 1"),
        ('{"max_batch_size": 2.5}', "max_batch_size must be a number (an integer)"),
        ('{"max_batch_delay_ms": -1}', "max_batch_delay_ms must be >= 0"),
        ('{"default_version": "2"}', "default_version must be a positive integer"),
        ('{"version_policy": {"newest": {}}}', "version_policy must be one of"),
        ('{"version_policy": {"specific": {"versions": []}}}', "non-empty list"),
        ('{"canary": {"version": 2}}', 'canary must be {"version": N, "weight": W}'),
        ('{"canary": {"version": 2, "weight": 1.5}}', "canary weight must lie in [0, 1]"),
    ],
)
def test_a_bad_config_json_is_refused_naming_the_file_and_the_key(text, message):
    with pytest.raises(RepositoryError) as info:
        parse_config(text, "cnn/config.json")
    assert str(info.value).startswith("cnn/config.json: ") and message in str(info.value)


def test_a_bad_config_json_is_kept_as_the_models_error_not_the_repositorys(tmp_path):
    make(tmp_path, {"cnn": {"1": b"a", "config.json": '{"max_queue": -3}'}, "mlp": {"1": b"a"}})
    models = scan(tmp_path)
    assert "max_queue must be at least 1" in models["cnn"].config_error and not models["mlp"].config_error


def test_model_names_are_single_path_components():
    for good in ("cnn", "bitmoji-cnn", "mlp_v2", "a.b", "7"):
        assert check_name(good) == good
    for bad in ("", ".hidden", "../etc", "a/b", "a b", "x" * 129, "-flag"):
        with pytest.raises(RepositoryError):
            check_name(bad)
    assert server_config.NAME.pattern == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # the flags check names the same way
