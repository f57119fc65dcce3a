"""One writer per work directory: a second training command on a locked one exits 2 at once,
names the process that holds it, and writes nothing; readers take no lock."""

import fcntl
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import mnist_jax
from experiments import dense_relu
from mnist_jax import cli, evaluate, metrics, recipe
from tests.conftest import ROOT
from tests.helpers import inprocess

SMALL = ["--epochs", "1", "--data-train-limit", "1024", "--plots", "false"]


def listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def run(capsys, *argv):
    return inprocess.stage(capsys, *argv)


def test_a_locked_directory_is_refused_unchanged_and_readers_still_read(mnist_dir, tmp_path, capsys):  # fmt: skip
    args = [*SMALL, "--data-dir", str(mnist_dir), "--workdir", str(tmp_path)]
    assert run(capsys, *args)[0] == 0
    before = listing(tmp_path)
    fd = os.open(tmp_path, os.O_RDONLY)  # what a training process holds
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        for extra in ([], ["--epochs", "2"], ["--restart"]):
            code, out, err = run(capsys, *args, *extra)
            assert code == 2, err
            (line,) = err.strip().splitlines()
            assert f"another run is training there (process {os.getpid()}: " in line, line
            assert listing(tmp_path) == before  # nothing written, --restart deleted nothing
        evaluate.main(["--workdir", str(tmp_path)])  # readers take no lock
        assert "test accuracy" in capsys.readouterr().out
    finally:
        os.close(fd)
    code, out, err = run(capsys, *args, "--epochs", "2")
    assert code == 0 and "Resumed" in out, err  # the lock ended with its holder


def test_two_processes_on_one_directory_one_trains_the_other_exits_2(mnist_dir, tmp_path, capsys):  # fmt: skip
    """A second command (this test's own process), started while another process trains in the
    directory, exits 2 at once; the first's files are complete and its run is the one an
    undisturbed command trains, bit for bit."""
    workdir = tmp_path / "w"
    flags = ["--epochs", "2", "--plots", "false", "--data-dir", str(mnist_dir), "--workdir", str(workdir)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "experiments.dense_relu", *flags], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (workdir.exists() and "process" in recipe.holder(workdir)):  # it holds the lock
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli.run(dense_relu.get_config, flags)
    assert first.poll() is None, "the first command ended before the second was refused"
    assert refused.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"another run is training there (process {first.pid}: " in line
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    steps = [r["step"] for r in metrics.read(workdir / metrics.STEPS_FILE)]
    spe = 60_000 // 128  # a row each 50 steps of an epoch, and at its end
    assert steps == [e * spe + b for e in range(2) for b in range(1, spe + 1) if b % 50 == 0 or b == spe]  # fmt: skip
    cli.run(dense_relu.get_config, [*flags[:-1], str(tmp_path / "alone")])
    ours, alone = (mnist_jax.restore(d).variables for d in (workdir, tmp_path / "alone"))
    assert jax.tree.all(jax.tree.map(np.array_equal, ours, alone))


def test_a_filesystem_without_locks_trains_with_one_warning(mnist_dir, tmp_path, capsys, monkeypatch):  # fmt: skip
    """NFS directories, Lustre mounted noflock: flock fails with ENOLCK or EOPNOTSUPP. The run
    goes on, once warned; a lock held (EWOULDBLOCK) stays a refusal (the test above)."""
    import errno

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)
    workdir = tmp_path / "w"
    code, out, err = run(capsys, *SMALL, "--data-dir", mnist_dir, "--workdir", workdir)
    assert code == 0, err
    assert err.count("its filesystem takes no locks") == 1, err
    assert [r["epoch"] for r in metrics.read(workdir / "metrics.jsonl")] == [1]
