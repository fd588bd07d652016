"""`bitmoji-train --help`: every command has a description, every option a help string that gives its default."""

import re

import pytest

from bitmoji.trainer import cli
from bitmoji.trainer.train import TrainConfig

COMMANDS = ["synth", "fit", "predict", "publish"]


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def sections(text: str) -> dict[str, list[str]]:
    """argparse's help split at its unindented lines: "usage: ...", the description, "options:", ..."""
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = line
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def option_entries(text: str) -> dict[str, str]:
    """Each option's invocation ("--epochs EPOCHS") and its help, joined over wrapped lines."""
    entries: dict[str, str] = {}
    invocation = None
    for line in sections(text)["options:"]:
        start = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if start:
            invocation = start.group(1)
            entries[invocation] = start.group(2) or ""
        elif invocation is not None and line.strip():
            entries[invocation] = f"{entries[invocation]} {line.strip()}".strip()
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_help_string_that_gives_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = help_text(capsys, command)
    usage_line = text.splitlines()[0]
    usage = " ".join([usage_line, *sections(text)[usage_line]])
    entries = option_entries(text)
    # the parse saw every option the usage line names (none hides in a layout it does not know)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", usage))
    seen = {flag for invocation in entries for flag in re.findall(r"--[a-z][a-z-]*", invocation)}
    assert named and named <= seen, named - seen
    entries.pop("-h, --help")
    missing = [f"{invocation}: {help!r}" for invocation, help in entries.items() if not help]
    no_default = [
        f"{invocation}: {help!r}"
        for invocation, help in entries.items()
        if not re.search(r"\((default: [^)]+|required)\)", help) or "default: None" in help
    ]
    assert not missing, f"{command} options without a help string: {missing}"
    assert not no_default, f"{command} options whose help gives no default (or says it is required): {no_default}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_describes_itself(command, capsys):
    text = help_text(capsys, command)
    description = [line for line in sections(text) if not line.startswith("usage:") and not line.endswith(":")]
    assert description and len(description[0]) > 20, text


def test_the_top_level_help_lists_every_command(capsys):
    listed = sections(help_text(capsys))["positional arguments:"]
    assert all(any(line.startswith(f"    {name} ") for line in listed) for name in COMMANDS), listed


def test_fit_defaults_are_the_train_configs():
    """The defaults the help shows are the ones a TrainConfig (what tests and other callers build) gets."""
    args = cli.build_parser().parse_args(["fit", "--data", "d", "--out", "o"])
    fields = {k: v for k, v in vars(args).items() if k != "command"}
    assert TrainConfig(**fields) == TrainConfig(data="d", out="o")
