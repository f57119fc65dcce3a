"""Interrupted runs end exactly as uninterrupted ones: SIGKILL, SIGTERM, damaged checkpoints."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
import pytest

import mnist_jax
from experiments import conv_bn, dense_dropout, dense_relu
from mnist_jax import cli, metrics
from tests.conftest import ROOT


def command(workdir, mnist_dir, *extra):
    # conv_bn (batch norm, dropout), 10 steps an epoch, a checkpoint every 3 steps.
    return [
        sys.executable,
        "-m",
        "experiments.conv_bn",
        "--epochs",
        "3",
        "--data-train-limit",
        "640",
        "--data-test-limit",
        "500",
        "--checkpoint-every",
        "3",
        "--log-every",
        "4",
        "--plots",
        "false",
        "--data-dir",
        str(mnist_dir),
        "--workdir",
        str(workdir),
        *extra,
    ]


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run(workdir, mnist_dir, *extra, capsys=None):
    """The command, run in this process: a process boundary matters only to kills and signals,
    and each Python start costs seconds (imports, Orbax, a compile-cache read)."""
    if capsys:
        capsys.readouterr()  # only this run's output
    try:
        cli.run(conv_bn.get_config, command(workdir, mnist_dir, *extra)[3:])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr() if capsys else None
    return Result(code, out.out if out else "", out.err if out else "")


def assert_same_run(a, b):
    """Same final parameters, batch statistics and logs (wall times aside), each epoch once."""
    ra, rb = mnist_jax.restore(a), mnist_jax.restore(b)
    assert ra.step == rb.step == 30
    jax.tree.map(np.testing.assert_array_equal, ra.variables, rb.variables)
    for name in ("metrics.jsonl", "train_steps.jsonl"):
        rows_a = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics.read(a / name)]
        rows_b = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics.read(b / name)]
        assert rows_a == rows_b, name
    assert [r["epoch"] for r in metrics.read(b / "metrics.jsonl")] == [1, 2, 3]


@pytest.fixture(scope="module")
def reference(mnist_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    result = run(workdir, mnist_dir)
    assert result.returncode == 0, result.stderr
    return workdir


def latest_checkpoint(workdir) -> int:
    """Newest committed checkpoint step (Orbax writes into a temporary name, then renames)."""
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=0)


@pytest.mark.after_suite  # processes killed: run by .ci/run after the suite
def test_sigkill_at_random_moments_then_resume(reference, mnist_dir, tmp_path):
    rng = random.Random(0)
    kills = []
    # Three launches, each killed: a launch that ends the run leaves the next nothing to kill,
    # so "3 kills in 4 launches", as this was, always meant the first 3 (and one launch more).
    for _ in range(3):
        before = latest_checkpoint(tmp_path)
        proc = subprocess.Popen(
            command(tmp_path, mnist_dir),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while proc.poll() is None and latest_checkpoint(tmp_path) <= before:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Training has made progress: kill it a random moment later, mid-epoch or while the
        # next checkpoint is being written.
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.kill()
            kills.append(latest_checkpoint(tmp_path))
        proc.wait()
    assert len(kills) == 3, kills  # the test must really interrupt the run, several times
    final = run(tmp_path, mnist_dir)
    assert final.returncode == 0, final.stderr
    assert_same_run(reference, tmp_path)


def test_killed_before_the_first_checkpoint_the_same_command_goes_on(reference, mnist_dir, tmp_path):  # fmt: skip
    """A requeued job re-runs its command: killed in start-up, then during the first save, then
    mid-epoch, it must each time go on, and end as the uninterrupted run."""
    start = lambda: subprocess.Popen(command(tmp_path, mnist_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip  # noqa: E731

    # Each kill is checked against the files it left (a killed process changes nothing after):
    # a kill that missed its moment fails the test rather than passing untested.
    def kill(proc):
        proc.kill()
        assert proc.wait() == -signal.SIGKILL  # killed, not ended by itself
        names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*"))
        return names, metrics.read(tmp_path / "train_steps.jsonl")

    proc = start()  # 1. in start-up: imports, data, compilation
    time.sleep(1.0)
    names, rows = kill(proc)
    assert latest_checkpoint(tmp_path) == 0 and not rows, (names, rows)  # not a step logged
    proc = start()  # 2. while Orbax writes the first checkpoint (a temporary directory)
    deadline = time.monotonic() + 300
    tmp = ".orbax-checkpoint-tmp"
    while proc.poll() is None and not any(tmp in p.name for p in (tmp_path / "checkpoints").glob("*")):  # fmt: skip
        assert time.monotonic() < deadline
        time.sleep(0.001)
    names, _ = kill(proc)
    # the first save (step 3) half written, none committed
    assert latest_checkpoint(tmp_path) == 0 and any(tmp in n for n in names), names
    proc = start()  # 3. mid-epoch, after checkpoints
    while proc.poll() is None and latest_checkpoint(tmp_path) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    names, rows = kill(proc)
    # Checkpoints 3 and 6 (maybe 9) of the 10-step epoch 1 committed, its end not reached: no
    # epoch row, and the step rows (every 4 steps) short of step 10.
    assert 6 <= latest_checkpoint(tmp_path) < 10, names
    assert not metrics.read(tmp_path / "metrics.jsonl"), rows
    assert max((r["step"] for r in rows), default=0) < 10, rows
    final = run(tmp_path, mnist_dir)
    assert final.returncode == 0, final.stderr
    assert_same_run(reference, tmp_path)


def test_signals_save_and_say_how_to_resume(reference, mnist_dir, tmp_path, capsys):
    """SIGTERM (a scheduler's preemption) in epoch 2, then SIGINT (Ctrl-C) to the resumed run in
    epoch 3: each saves, exits 128 + the signal with one line that says how to resume; then the
    same command ends as the uninterrupted run. (One chain: a process start is seconds here.)"""
    for signum, after in ((signal.SIGTERM, "epoch   1/3"), (signal.SIGINT, "epoch   2/3")):
        proc = subprocess.Popen(
            command(tmp_path, mnist_dir),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(after):  # inside the next epoch now
                proc.send_signal(signum)
                break
        out, err = proc.communicate(timeout=300)
        out = "".join(lines) + out
        assert proc.returncode == 128 + signum, (signum, err[-2000:])
        assert f"interrupted ({signal.Signals(signum).name})" in err and f"--workdir {tmp_path}" in err  # fmt: skip
        assert len(err.strip().splitlines()) == 1
    assert "Resumed" in out  # the SIGINT went to a resumed run
    resumed = run(tmp_path, mnist_dir, capsys=capsys)
    assert resumed.returncode == 0 and "Resumed" in resumed.stdout
    assert_same_run(reference, tmp_path)


def _damage(step_dir, how):
    if how == "truncated files":
        for f in (p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "a file deleted":
        next(p for p in (step_dir / "model").rglob("*") if p.is_file() and "manifest" in p.name).unlink()
    elif how == "metrics missing":
        (step_dir / "metrics" / "metrics").unlink()


@pytest.fixture(scope="module")
def two_epochs(mnist_dir, tmp_path_factory):
    """The reference command stopped after 2 of its 3 epochs: each damage case gets a copy."""
    workdir = tmp_path_factory.mktemp("two_epochs")
    assert run(workdir, mnist_dir, "--epochs", "2").returncode == 0  # the last value of a flag wins
    return workdir


@pytest.mark.parametrize("how", ["truncated files", "a file deleted", "metrics missing"])
def test_damaged_latest_checkpoint_falls_back(reference, two_epochs, mnist_dir, tmp_path, how, capsys):  # fmt: skip
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    _damage(tmp_path / "checkpoints" / "20", how)
    result = run(tmp_path, mnist_dir, capsys=capsys)
    assert result.returncode == 0, result.stderr
    moved = tmp_path / "damaged" / "20"
    assert f"checkpoint {tmp_path / 'checkpoints' / '20'} is damaged (" in result.stderr
    assert f"moved to {moved}, trying the previous one" in result.stderr
    assert moved.is_dir() and any(moved.rglob("*"))  # kept, out of Orbax's way
    assert "Resumed" in result.stdout and "at step 18" in result.stdout
    assert_same_run(reference, tmp_path)


def test_no_readable_checkpoint_refuses_then_restart_works(mnist_dir, tmp_path, capsys):
    args = ["--epochs", "1", "--checkpoint-every", "0"]
    assert run(tmp_path, mnist_dir, *args).returncode == 0
    _damage(tmp_path / "checkpoints" / "10", "truncated files")
    refused = run(tmp_path, mnist_dir, *args, capsys=capsys)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith(
        f"no readable checkpoint in {tmp_path / 'checkpoints'}; add --restart to start over"
    )
    # the metrics of the old run are still there, so a plain rerun still refuses to start over
    again = run(tmp_path, mnist_dir, *args, capsys=capsys)
    assert again.returncode == 2 and "add --restart" in again.stderr
    assert run(tmp_path, mnist_dir, *args, "--restart").returncode == 0
    assert [r["epoch"] for r in metrics.read(tmp_path / "metrics.jsonl")] == [1]


def diverging_run(mnist_dir, workdir, capsys, *extra):
    """dense_relu with plain SGD at lr 1e10: the weights overflow within a few steps."""
    args = ["--opt-name", "sgd", "--opt-lr", "1e10", "--plots", "false"]
    args += ["--data-dir", str(mnist_dir), "--workdir", str(workdir), *extra]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(dense_relu.get_config, args)
    return Result(e.value.code, *capsys.readouterr())


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_checkpoint(mnist_dir, tmp_path, capsys):
    result = diverging_run(mnist_dir, tmp_path, capsys, "--checkpoint-every", "1")
    assert result.returncode == 3
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: training loss became nan at epoch 1, step ")
    step = int(line.split("step ")[1].split()[0])
    kept = mnist_jax.restore(tmp_path)
    assert kept.step == step - 1 and f"last good checkpoint: step {step - 1}" in line
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept.variables))


def test_debug_nans_run_still_stops_cleanly(mnist_dir, tmp_path, capsys):
    """--debug-nans turns on jax_debug_nans; whichever check fires first, exit 3, one line."""
    result = diverging_run(mnist_dir, tmp_path, capsys, "--debug-nans", "true")
    assert result.returncode == 3
    (line,) = result.stderr.strip().splitlines()
    assert "nan" in line and "at epoch 1, step" in line


def test_same_seed_same_run(reference, mnist_dir, tmp_path):
    result = run(tmp_path, mnist_dir)
    assert result.returncode == 0
    assert_same_run(reference, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["seed"] == 0


@pytest.mark.after_suite  # processes killed: run by .ci/run after the suite
def test_sigkill_with_seeds_and_steps_per_call_then_resume(mnist_dir, tmp_path, capsys):
    """Two seeds vmapped (dense_dropout), K = 3 steps a call, 80 steps, a checkpoint every 20 (not
    a multiple of K): killed at random moments, then resumed, each seed ends bit for bit as the
    uninterrupted run. Seeds save one after another, so a kill can fall between their saves."""
    args = ["--seeds", "2", "--steps-per-call", "3", "--epochs", "2", "--data-train-limit",
            "5120", "--data-test-limit", "1000", "--checkpoint-every", "20", "--log-every", "5",
            "--plots", "false", "--data-dir", str(mnist_dir)]  # fmt: skip
    cli.run(dense_dropout.get_config, [*args, "--workdir", str(tmp_path / "reference")])
    work = tmp_path / "killed"
    cmd = [sys.executable, "-m", "experiments.dense_dropout", *args, "--workdir", str(work)]
    rng, kills = random.Random(0), []
    for _ in range(2):
        before = latest_checkpoint(work / "seed_1")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300
        while proc.poll() is None and latest_checkpoint(work / "seed_1") <= before:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.kill()
            kills.append(latest_checkpoint(work / "seed_1"))
        proc.wait()
    assert kills, "the run ended before any kill"
    print("killed after checkpoints", kills)
    cli.run(dense_dropout.get_config, [*args, "--workdir", str(work)])
    for seed in ("seed_0", "seed_1"):
        a, b = mnist_jax.restore(tmp_path / "reference" / seed), mnist_jax.restore(work / seed)
        assert a.step == b.step == 80  # 2 epochs of 40 steps
        jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
        for name in ("metrics.jsonl", "train_steps.jsonl"):
            strip = lambda d: [{k: v for k, v in r.items() if k != "seconds"} for r in metrics.read(d / seed / name)]  # noqa: E731  # fmt: skip
            assert strip(tmp_path / "reference") == strip(work), (seed, name)
