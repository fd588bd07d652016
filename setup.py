"""Which `bitmoji` sub-packages (and their commands) to install: those whose folders are present.

Everything else about the project is in pyproject.toml, including where each
sub-package's folder is (`[tool.setuptools.package-dir]`). A checkout has them
all; the server's Docker image copies proto/, core/, server/ and client/ only,
so it installs no trainer code and no `bitmoji-train` command.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# package -> (its folder, the command it provides)
PACKAGES = {
    "bitmoji": ("proto/bitmoji", None),
    "bitmoji.v1": ("proto/bitmoji/v1", None),
    "bitmoji.inference": ("proto/bitmoji/inference", None),
    "bitmoji.core": ("core", None),
    "bitmoji.client": ("client", "bitmoji-client = bitmoji.client.cli:main"),
    "bitmoji.server": ("server", "bitmoji-serve = bitmoji.server.cli:main"),
    "bitmoji.trainer": ("trainer", "bitmoji-train = bitmoji.trainer.cli:main"),
}
present = {name: command for name, (folder, command) in PACKAGES.items() if (ROOT / folder / "__init__.py").is_file()}

setup(
    packages=list(present),
    entry_points={"console_scripts": [command for command in present.values() if command]},
)
