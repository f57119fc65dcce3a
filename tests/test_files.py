"""Files a kill cannot leave unreadable: rewrites are atomic, a cut-short append is dropped."""

import json
import os
from pathlib import Path

import pytest

from mnist_jax import flags, metrics, recipe
from tests.helpers import inprocess

SMALL = ["--epochs", "1", "--data-train-limit", "1024", "--plots", "false", "--log-every", "4"]


def run(capsys, mnist_dir, workdir, *extra):
    return inprocess.stage(capsys, *SMALL, "--data-dir", mnist_dir, "--workdir", workdir, *extra)


@pytest.mark.parametrize("name", [metrics.EPOCHS_FILE, metrics.STEPS_FILE, recipe.HISTORY])
def test_a_cut_short_last_line_is_dropped_with_a_warning_and_the_run_goes_on(mnist_dir, tmp_path, capsys, name):  # fmt: skip
    code, _, err = run(capsys, mnist_dir, tmp_path)
    assert code == 0, err
    before = metrics.read(tmp_path / name)
    with open(tmp_path / name, "a") as f:
        f.write('{"step": 99, "lo')  # a kill in the middle of an append
    code, out, err = run(capsys, mnist_dir, tmp_path, "--epochs", "2")
    assert code == 0, err
    assert f"warning: {tmp_path / name}: its last line is incomplete" in err
    assert "Resumed" in out
    rows = metrics.read(tmp_path / name)
    assert rows[: len(before)] == before and all(r.get("step") != 99 for r in rows)


def test_a_damaged_line_before_the_last_is_an_error_not_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        metrics.read(path)


@pytest.mark.parametrize("target", ["config.json", "summary.txt", metrics.EPOCHS_FILE])
def test_a_rewrite_cut_short_leaves_the_old_file_and_the_command_goes_on(mnist_dir, tmp_path, capsys, monkeypatch, target):  # fmt: skip
    """A start rewrites config.json, summary.txt and metrics.jsonl. Cut short (a kill, a full
    disk) after the new text is half written, the file is as it was and the same command then
    resumes: the half-written text was never in the file's place."""
    code, _, err = run(capsys, mnist_dir, tmp_path)
    assert code == 0, err
    old = (tmp_path / target).read_text()
    real_mkstemp, real_fdopen, ours = flags.tempfile.mkstemp, os.fdopen, {}

    def mkstemp(*args, **kwargs):  # note the descriptor of the target's temporary file
        fd, name = real_mkstemp(*args, **kwargs)
        if Path(name).name.startswith(f".{target}."):
            ours["fd"] = fd
        return fd, name

    class HalfThenFail:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return HalfThenFail(f) if fd == ours.get("fd") else f

    monkeypatch.setattr(flags.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", fdopen)
    code, _, err = run(capsys, mnist_dir, tmp_path, "--epochs", "2")
    assert code == 2 and "no space left on device" in err.lower(), err  # one line (cli.run)
    monkeypatch.undo()
    assert (tmp_path / target).read_text() == old
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    code, out, err = run(capsys, mnist_dir, tmp_path, "--epochs", "2")
    assert code == 0 and "Resumed" in out, err
    assert [r["epoch"] for r in metrics.read(tmp_path / metrics.EPOCHS_FILE)] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 2


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    flags.write_atomic(tmp_path / "a.json", "{}\n")
    flags.write_atomic(tmp_path / "a.json", "[]\n")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").read_text() == "[]\n"
