"""Publishing to a model repository: the next integer version, atomically, also against a concurrent publisher."""

import errno
import os
import subprocess
import sys
import threading

import pytest

from bitmoji.core import modelfile
from bitmoji.trainer import publish
from bitmoji.trainer.publish import PublishError, publish_version
from bitmoji.trainer.train import TrainConfig, fit


def model_bytes(tmp_path, tag: str, size: int = 1 << 20):
    """A stand-in model file: `size` bytes that differ per `tag` (publish_version copies, it does not load)."""
    path = tmp_path / f"{tag}.pt"
    path.write_bytes(tag.encode() + os.urandom(size))
    return path


def entries(folder) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def test_versions_are_1_2_3_in_order_each_a_copy_of_its_file(tmp_path):
    repository = tmp_path / "repo"
    sources = [model_bytes(tmp_path, f"m{i}") for i in range(3)]
    published = [publish_version(source, repository, "cnn") for source in sources]
    assert published == [repository / "cnn" / str(v) for v in (1, 2, 3)]
    for folder, source in zip(published, sources, strict=True):
        assert entries(folder) == ["model.pt"] and (folder / "model.pt").read_bytes() == source.read_bytes()
    assert entries(repository / "cnn") == ["1", "2", "3"]  # no staging folder left behind


def test_numbering_ignores_what_is_not_an_integer_version(tmp_path):
    model_dir = tmp_path / "repo" / "cnn"
    for name in ("latest", "v9", ".tmp-123-0badc0ffee00", "12.5", "3"):  # a crashed publish's .tmp-* among them
        (model_dir / name).mkdir(parents=True)
    (model_dir / ".tmp-123-0badc0ffee00" / "model.pt").write_bytes(b"half a mod")
    (model_dir / "config.json").write_text("{}")
    assert publish_version(model_bytes(tmp_path, "m"), tmp_path / "repo", "cnn") == model_dir / "4"
    other = tmp_path / "repo" / "mlp"
    (other / "best").mkdir(parents=True)
    assert publish_version(model_bytes(tmp_path, "m"), tmp_path / "repo", "mlp") == other / "1"


def test_concurrent_publishers_get_distinct_complete_versions(tmp_path, monkeypatch):
    """Every thread reads the same next number before any renames, so all but one must find it taken and move on."""
    threads = 6
    repository = tmp_path / "repo"
    sources = [model_bytes(tmp_path, f"m{i}", size=4 << 20) for i in range(threads)]
    everyone_counted = threading.Barrier(threads, timeout=30)
    counted = threading.local()
    real_next_version = publish.next_version

    def next_version_then_wait(model_dir):
        version = real_next_version(model_dir)
        if not getattr(counted, "once", False):  # each thread's first count: all get 1
            counted.once = True
            everyone_counted.wait()
        return version

    monkeypatch.setattr(publish, "next_version", next_version_then_wait)
    results: dict[int, object] = {}

    def publish_one(i: int) -> None:
        try:
            results[i] = publish_version(sources[i], repository, "cnn")
        except BaseException as exc:  # noqa: B036 (reported below, with the others)
            results[i] = exc

    workers = [threading.Thread(target=publish_one, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    assert sorted(int(results[i].name) for i in range(threads)) == list(range(1, threads + 1))
    for i in range(threads):
        assert entries(results[i]) == ["model.pt"]
        assert (results[i] / "model.pt").read_bytes() == sources[i].read_bytes()
    assert entries(repository / "cnn") == [str(v) for v in range(1, threads + 1)]


def test_a_crash_before_the_rename_leaves_no_version(tmp_path, monkeypatch):
    repository = tmp_path / "repo"
    source = model_bytes(tmp_path, "m")

    def rename_fails(src, dst):
        assert (src / "model.pt").read_bytes() == source.read_bytes()  # the copy was complete: the crash is after it
        raise OSError(errno.EIO, "simulated crash", str(dst))

    monkeypatch.setattr(publish.os, "rename", rename_fails)
    with pytest.raises(OSError, match="simulated crash"):
        publish_version(source, repository, "cnn")
    monkeypatch.undo()
    assert entries(repository / "cnn") == []  # neither a version nor the staging folder
    assert publish_version(source, repository, "cnn") == repository / "cnn" / "1"


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../cnn", "/abs", "a b", "cnn\n", "é"])
def test_a_bad_name_is_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(PublishError, match="model name"):
        publish_version(model_bytes(tmp_path, "m"), tmp_path / "repo", name)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["cnn", "bitmoji-cnn", "cnn_v2.1", "7"])
def test_good_names(name):
    assert publish.check_name(name) == name


def test_a_missing_model_file_is_refused(tmp_path):
    with pytest.raises(PublishError, match="no such model file"):
        publish_version(tmp_path / "none.pt", tmp_path / "repo", "cnn")


def test_fit_refuses_a_bad_name_before_it_trains(tmp_path):
    # no data folder: had fit got as far as loading data, it would raise DataError instead
    with pytest.raises(PublishError, match="model name '.hidden'"):
        fit(
            TrainConfig(
                data=str(tmp_path / "none"), out=str(tmp_path / "out"), repository=str(tmp_path), name=".hidden"
            )
        )
    with pytest.raises(PublishError, match="give a --repository"):
        fit(TrainConfig(data=str(tmp_path / "none"), out=str(tmp_path / "out"), name="cnn"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_publish_loads_the_model_first_and_prints_the_path(tmp_path, cnn_model_file):
    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bitmoji.trainer", "publish", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    repository = tmp_path / "repo"
    r = run("--model", str(cnn_model_file), "--repository", str(repository), "--name", "cnn")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"published {repository / 'cnn' / '1' / 'model.pt'}"
    assert modelfile.load_model(repository / "cnn" / "1" / "model.pt").sha256 == modelfile.file_sha256(cnn_model_file)
    not_a_model = model_bytes(tmp_path, "junk", size=100)
    r = run("--model", str(not_a_model), "--repository", str(repository), "--name", "cnn")
    assert r.returncode == 2 and "not a loadable TorchScript file" in r.stderr and "Traceback" not in r.stderr
    r = run("--model", str(cnn_model_file), "--repository", str(repository), "--name", "../up")
    assert r.returncode == 2 and "model name '../up'" in r.stderr
    assert entries(repository / "cnn") == ["1"]
