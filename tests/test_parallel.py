"""Data parallelism over a device mesh (several processes: tests/test_multihost.py).

XLA_FLAGS=--xla_force_host_platform_device_count=N gives N CPU devices; it must be set before
JAX starts, so every case that needs several devices runs in one shared subprocess (on_devices).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mnist_jax
from experiments import conv_bn, dense_relu
from mnist_jax import cli, metrics, recipe
from tests.conftest import ROOT

pytestmark = pytest.mark.after_suite  # processes: run by .ci/run after the suite

SMALL = ["--data-train-limit", "2048", "--data-test-limit", "1000", "--epochs", "2", "--plots", "false"]  # fmt: skip
# The runs compared across device counts: conv_bn 16 steps an epoch, dense_relu 8.
TINY = ["--data-train-limit", "1024", "--data-test-limit", "500", "--plots", "false"]


def python(*args, devices=1, data_dir=None, wait=True):
    # Forced CPU devices on any machine: these tests are of the multi-device code, not a GPU.
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    if data_dir:
        env["MNIST_DATA_DIR"] = str(data_dir)
    cmd = [sys.executable, "-m", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def on_devices(mnist_dir, tmp_path_factory):
    """The stage commands that need several devices, all in one process with 4 (each process
    start is seconds here): (their work directories' parent, {name: code, stdout, stderr})."""
    root = tmp_path_factory.mktemp("devices")
    data = ["--data-dir", str(mnist_dir)]
    seeds = ["dense_relu", "--seed-mode", "vmap", "--devices", "2", *TINY, "--epochs", "1", *data]
    commands = {
        "data parallel": ["conv_bn", *TINY, "--epochs", "1", "--devices", "4", "--workdir", str(root / "dp")],  # data: $MNIST_DATA_DIR
        "seeds": [*seeds, "--seeds", "2", "--workdir", str(root / "two")],
        "3 seeds": [*seeds, "--seeds", "3", "--workdir", str(root / "three")],
        "--devices 3": ["conv_bn", *SMALL, "--workdir", str(root / "w3"), *data, "--devices", "3"],
        "--devices 8": ["conv_bn", *SMALL, "--workdir", str(root / "w8"), *data, "--devices", "8"],
        "steps": ["tests.helpers.dp_steps", "4", "10", str(mnist_dir), "sgd,adam"],
    }  # fmt: skip
    out = python("tests.helpers.commands", json.dumps(list(commands.values())), devices=4, data_dir=mnist_dir)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return root, dict(zip(commands, json.loads(out.stdout.strip().splitlines()[-1])))


@pytest.fixture(scope="module")
def steps(on_devices):
    """10 conv_bn steps on 1 and on 4 devices, same batches, under SGD and under Adam."""
    return on_devices[1]["steps"]


def test_four_devices_match_one_device(steps):
    """Same global batches and seed: SGD parameters agree to float rounding (8e-7 seen)."""
    r = steps["sgd"]
    assert steps["devices"] == 4 and r["param_copies"] == 4
    # Batch-norm over a 16-image device shard instead of the 64-image batch would change the
    # very first loss; it is equal to float rounding.
    np.testing.assert_allclose(r["loss_n"], r["loss_1"], rtol=1e-5)
    assert r["params_rel_diff"] < 1e-5
    assert r["batch_stats_rel_diff"] < 1e-5
    assert r["eval_acc_n"] == r["eval_acc_1"]


def test_four_devices_adam_tracks_one_device(steps):
    """Adam's early steps are lr * sign(g), which float noise can flip: losses within 2%."""
    r = steps["adam"]
    assert r["loss_n"][0] == pytest.approx(r["loss_1"][0], rel=1e-6)
    np.testing.assert_allclose(r["loss_n"], r["loss_1"], rtol=2e-2)


def test_data_parallel_run_resumes_on_one_device(on_devices, mnist_dir, tmp_path, monkeypatch, capsys):  # fmt: skip
    """A 4-device run's checkpoint (epoch 1 of 2) resumes on 1 device (this process's) from
    exactly the state it saved, and ends where an uninterrupted 1-device run ends (to a bound:
    the 4 devices' sums are float-rounded in another order)."""
    root, results = on_devices
    first, workdir = results["data parallel"], root / "dp"
    assert first["code"] == 0, first["stderr"][-2000:]
    assert "Data-parallel over 4 cpu devices" in first["stdout"]
    saved = mnist_jax.restore(workdir)
    assert saved.step == 1024 // 64
    restored, restore_latest = [], recipe.restore_latest

    def spy(*args):  # what the resumed run restores, copied before its training donates it
        found = restore_latest(*args)
        restored.append(found and jax.device_get({"params": found[0].params, "batch_stats": found[0].batch_stats}))  # fmt: skip
        return found

    monkeypatch.setattr(recipe, "restore_latest", spy)
    argv = [*TINY, "--epochs", "2", "--data-dir", str(mnist_dir), "--workdir"]
    capsys.readouterr()
    cli.run(conv_bn.get_config, [*argv, str(workdir)])
    assert "Resumed" in capsys.readouterr().out
    # what the 1-device run went on from: the checkpoint, leaf by leaf
    jax.tree.map(np.testing.assert_array_equal, restored[0], saved.variables)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]

    cli.run(conv_bn.get_config, [*argv, str(tmp_path / "one")])  # uninterrupted, 1 device
    a, b = mnist_jax.restore(workdir), mnist_jax.restore(tmp_path / "one")
    assert a.step == b.step == 2 * 1024 // 64
    # Adam: the 4 devices' float rounding in epoch 1, grown where an update is lr * sign(g)
    # (test_four_devices_adam_tracks_one_device). Measured: parameters 0.40% apart (relative L2
    # norm), each epoch's test accuracy equal (56.6%, 89.6%). Bounds: 2%, and 1 point.
    x, y = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(r.variables["params"])]) for r in (a, b))  # fmt: skip
    assert np.linalg.norm(x - y) / np.linalg.norm(y) < 0.02
    accuracy = [[r["test_accuracy"] for r in metrics.read(d / "metrics.jsonl")] for d in (workdir, tmp_path / "one")]  # fmt: skip
    assert accuracy[0] == pytest.approx(accuracy[1], abs=0.01), accuracy


@pytest.mark.parametrize(
    "args, devices, message",
    [
        (["--devices", "3"], 4, "--batch-size: 64 does not split over 3 devices; use a multiple of 3"),
        (["--devices", "8"], 4, "--devices: 8 asked, 4 available (cpu)"),
        (["--devices", "-1"], 1, "--devices: must be 0 (all) or positive, got -1"),
        (["--distributed-coordinator", "localhost:1"], 1, "--distributed-coordinator needs --distributed-num-processes N"),
    ],
)  # fmt: skip
def test_bad_parallel_flags_are_one_line(args, devices, message, on_devices, mnist_dir, tmp_path, capsys):  # fmt: skip
    if devices == 1:  # this process has one device: no process needed
        argv = [*SMALL, "--workdir", str(tmp_path / "w"), "--data-dir", str(mnist_dir), *args]
        with pytest.raises(SystemExit) as e:
            cli.run(conv_bn.get_config, argv)
        code, err = e.value.code, capsys.readouterr().err
    else:
        result = on_devices[1][" ".join(args)]
        code, err = result["code"], result["stderr"]
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_vmapped_seeds_spread_over_the_devices(on_devices, mnist_dir, tmp_path):
    """--seeds 2 on 2 devices: one seed a device, no gradient traffic; each seed's run is the
    single-device run of that seed (dense: float for float, measured equal)."""
    root, results = on_devices
    out = results["seeds"]
    assert out["code"] == 0, out["stderr"][-2000:]
    assert "2 seeds (0-1) in one vmapped program, 1 per device on 2 devices" in out["stdout"]
    for seed in (0, 1):
        cli.run(dense_relu.get_config, [*TINY, "--epochs", "1", "--seed", str(seed), "--data-dir", str(mnist_dir), "--workdir", str(tmp_path / f"one_{seed}")])  # fmt: skip
        a, b = mnist_jax.restore(tmp_path / f"one_{seed}"), mnist_jax.restore(root / "two" / f"seed_{seed}")  # fmt: skip
        assert a.step == b.step == 1024 // 128
        for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    bad = results["3 seeds"]
    assert bad["code"] == 2 and "--seeds: 3 seeds do not spread over 2 devices" in bad["stderr"]
