"""The server's configuration: flags, environment variables, defaults and the refusals of bad values."""

from __future__ import annotations

import pytest

from bitmoji.server.config import ServerConfig, parse_config


def test_flags_environment_and_defaults():
    env = {
        "BITMOJI_MODEL": "m.pt",
        "BITMOJI_MAX_BATCH_SIZE": "8",
        "BITMOJI_MAX_BATCH_DELAY_MS": "0.5",
        "BITMOJI_DISABLE_GRADIENT_PROBE": "1",
    }
    config = parse_config([], environ=env)
    assert (config.model, config.max_batch_size, config.max_batch_delay_ms, config.gradient_probe) == (
        "m.pt",
        8,
        0.5,
        False,
    )
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
        (["--optimize", "fast"], {}),
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


def test_optimize_flag_and_environment():
    assert parse_config(["--model", "m.pt"], environ={}).optimize == "auto"
    assert parse_config(["--model", "m.pt"], environ={"BITMOJI_OPTIMIZE": "off"}).optimize == "off"
    assert parse_config(["--model", "m.pt", "--optimize", "on"], environ={"BITMOJI_OPTIMIZE": "off"}).optimize == "on"
    with pytest.raises(ValueError, match="--optimize must be one of"):
        ServerConfig(model="m.pt", optimize="fast")
