"""Promises only a process of its own can show: a second Ctrl-C stops at once (exit 130, one
line, the last checkpoint kept), and the default compilation cache (~/.cache/mnist_jax, which
the suite's $JAX_COMPILATION_CACHE_DIR otherwise overrides) is written, then read by the next
run. linear on real MNIST, tiny budgets."""

import os
import re
import signal
import subprocess
import sys

import pytest

from experiments import linear
from mnist_jax import checkpoint, cli, metrics
from tests.conftest import ROOT

pytestmark = pytest.mark.after_suite  # processes: run by .ci/run after the suite

# The stage's command, with one hook added after the built-in ones: at step 7 (in the second
# epoch, the first's checkpoint, step 5, saved) it says READY and waits for a first Ctrl-C to be heard
# (run.stop, set by hooks.Preemption's handler), says FIRST, then waits on: only a second
# Ctrl-C ends the wait. A user's second Ctrl-C while the run works towards its stop.
STALLED = """
import sys, time
from experiments import linear
from mnist_jax import cli, hooks, loop

class Stall(hooks.Hook):
    def after_steps(self, run, metrics):
        if run.step == 7:
            print("READY", flush=True)
            while run.stop is None:
                time.sleep(0.01)
            print("FIRST", flush=True)
            while True:
                time.sleep(0.01)

defaults = loop.defaults
loop.defaults = lambda save=True: [*defaults(save), Stall()]
cli.run(linear.get_config, sys.argv[1:])
"""


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(mnist_dir, tmp_path, capsys):
    """The first Ctrl-C asks for a checkpoint and a stop; a second before that stop comes: exit
    130 at once, one line saying the latest checkpoint is kept, no checkpoint of the stop; the
    same command resumes from the epoch-1 checkpoint and finishes."""
    args = ["--data-dir", str(mnist_dir), "--workdir", str(tmp_path), "--epochs", "2",
            "--data-train-limit", "640", "--data-test-limit", "500", "--log-every", "1", "--plots",
            "false"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", STALLED, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    for expected in ("READY", "FIRST"):
        for line in proc.stdout:
            if line.strip() == expected:
                proc.send_signal(signal.SIGINT)
                break
        else:
            raise AssertionError(f"no {expected}: {proc.communicate(timeout=60)[1][-2000:]}")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err == "error: interrupted; the latest checkpoint (if any) is kept, run again to resume\n"  # fmt: skip
    assert checkpoint.steps(tmp_path) == [5]  # the first epoch's; none written for the stop
    cli.run(linear.get_config, args)
    assert f"Resumed {tmp_path} at step 5" in capsys.readouterr().out
    assert [r["epoch"] for r in metrics.read(tmp_path / "metrics.jsonl")] == [1, 2]


def cached_run(home, workdir, mnist_dir):
    """A tiny stage command with $HOME at `home` and no $JAX_COMPILATION_CACHE_DIR, JAX's
    compiler logging its cache's hits and misses; (its stderr, the cache's keys after it)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    # The suite's 0 (conftest.py) stays: JAX's default, 1 s, would cache none of these programs.
    env.update(HOME=str(home), JAX_DEBUG_LOG_MODULES="jax._src.compiler")
    done = subprocess.run([sys.executable, "-m", "experiments.linear", "--data-dir", str(mnist_dir),
                           "--workdir", str(workdir), "--epochs", "1", "--data-train-limit", "256",
                           "--data-test-limit", "100", "--plots", "false"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cache = home / ".cache" / "mnist_jax"  # config.compile_cache's default, ~/.cache/mnist_jax
    keys = {p.name.removesuffix("-cache") for p in cache.glob("*-cache")}
    return done.stderr, keys


def test_the_default_compilation_cache_is_written_then_read(mnist_dir, tmp_path):
    """Without $JAX_COMPILATION_CACHE_DIR a stage caches its programs in ~/.cache/mnist_jax:
    the first run misses and writes each (the training step among them); the second, in
    another work directory, hits every one and compiles none anew."""
    home = tmp_path / "home"
    home.mkdir()
    first, written = cached_run(home, tmp_path / "a", mnist_dir)
    missed = set(re.findall(r"PERSISTENT COMPILATION CACHE MISS for '[^']+' with key '([^']+)'", first))  # fmt: skip
    assert written and missed == written, (missed, written)
    assert any(key.startswith("jit_train_steps-") for key in written), written
    second, after = cached_run(home, tmp_path / "b", mnist_dir)
    hits = set(re.findall(r"Persistent compilation cache hit for '[^']+' with key '([^']+)'", second))  # fmt: skip
    assert "CACHE MISS" not in second and hits == written and after == written
