"""Publish a model file as the next version of a model in a model repository (Triton's layout).

    REPOSITORY/<name>/<version>/model.pt       versions: positive integers, 1, 2, 3, ...

A server watching the repository must never see half a version, and two
trainers publishing at once must not take the same number. So the version is
built in a hidden folder beside the versions (`.tmp-...`, which is not an
integer and so never a version), then renamed to its number in one step. A
rename onto a number another publisher took meanwhile fails, and we try the
next one. A crash before the rename leaves only a `.tmp-...` folder, which
numbering ignores (and which can be deleted).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from pathlib import Path

MODEL_FILE = "model.pt"
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # one path component, not hidden: no "..", no "/"


class PublishError(ValueError):
    """A model name or source file that cannot be published; the message says why."""


def check_name(name: str) -> str:
    """`name` if it is a model name: letters, digits, `-`, `_`, `.`, not starting with `.`."""
    if not NAME.fullmatch(name):
        raise PublishError(
            f"model name {name!r}: use letters, digits, '-', '_' and '.' (not first), e.g. 'cnn' or 'bitmoji-cnn'"
        )
    return name


def next_version(model_dir: Path) -> int:
    """One more than the highest integer entry of `model_dir` (1 when none); anything else in it is ignored."""
    taken = [int(entry.name) for entry in model_dir.iterdir() if entry.name.isdecimal() and entry.name.isascii()]
    return max(taken, default=0) + 1


def _fsync(path: Path) -> None:
    """Flush `path` (a file or a folder's entries) to disk, so a power cut cannot leave a version half-written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_version(model_path: str | os.PathLike, repository: str | os.PathLike, name: str) -> Path:
    """Copy `model_path` to REPOSITORY/NAME/<next version>/model.pt, atomically; return that version's folder.

    The caller vouches that the file is a model (fit has just verified it; `bitmoji-train publish` loads it first).
    """
    check_name(name)
    source = Path(model_path)
    if not source.is_file():
        raise PublishError(f"{source}: no such model file")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # the umask's permissions, as the versions beside it (tempfile.mkdtemp would make it 0700)
    try:
        shutil.copyfile(source, staging / MODEL_FILE)
        _fsync(staging / MODEL_FILE)
        version = next_version(model_dir)
        while True:
            try:  # fails if the number exists (POSIX would take over an empty folder: a publisher never leaves one)
                os.rename(staging, model_dir / str(version))
                break
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                version = max(version + 1, next_version(model_dir))  # taken meanwhile: the next free number
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(model_dir)
    return model_dir / str(version)
