"""Checkpoints: exact round trip, evaluate == logged test_accuracy, resume == uninterrupted run."""

import json

import jax
import numpy as np
import pytest

import mnist_jax
from experiments import conv_bn
from mnist_jax import evaluate, loop, metrics
from mnist_jax.config import ConfigError


def small_config(mnist_dir, epochs):
    config = conv_bn.get_config()
    config.data.dir = str(mnist_dir)
    config.data.train_limit = 640  # 10 steps of 64 per epoch
    config.data.test_limit = 1000
    config.epochs = epochs
    return config


@pytest.fixture(scope="module")
def two_epoch_run(mnist_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    state = loop.train_and_evaluate(small_config(mnist_dir, 2), workdir)
    return workdir, state


def test_restore_is_exact(two_epoch_run):
    workdir, state = two_epoch_run
    restored = mnist_jax.restore(workdir)
    assert restored.step == int(state.step) == 20
    jax.tree.map(np.testing.assert_array_equal, restored.variables["params"], state.params)
    jax.tree.map(np.testing.assert_array_equal, restored.variables["batch_stats"], state.batch_stats)
    logits = restored.model.apply(restored.variables, np.zeros((2, 28, 28, 1), np.float32), train=False)
    assert logits.shape == (2, 10)


def test_metrics_file_and_config(two_epoch_run):
    workdir, _ = two_epoch_run
    rows = metrics.read(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [10, 20]
    for key in (
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "learning_rate",
        "seconds",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.01, 0.00666])
    assert json.loads((workdir / "config.json").read_text())["model"]["batch_norm"] is True


@pytest.mark.parametrize("step", [None, 10])
def test_evaluate_reports_the_logged_accuracy(two_epoch_run, step):
    workdir, _ = two_epoch_run
    rows = {r["step"]: r for r in metrics.read(workdir / "metrics.jsonl")}
    result = evaluate.evaluate_checkpoint(workdir, step=step)
    assert result["accuracy"] == rows[result["step"]]["test_accuracy"]
    assert result["loss"] == pytest.approx(rows[result["step"]]["test_loss"], rel=1e-6)


def test_evaluate_command_writes_eval_json(two_epoch_run, capsys):
    workdir, _ = two_epoch_run
    evaluate.main(["--workdir", str(workdir), "--step", "20"])
    saved = json.loads((workdir / "eval.json").read_text())
    out = capsys.readouterr().out
    assert saved["step"] == 20 and f"{saved['accuracy']:.2%}" in out
    assert [n for _, n in saved["dead_units"].values()] == [12, 24, 32, 200]
    assert f"hidden_1 {saved['dead_units']['hidden_1'][0]}/24" in out


def test_resumed_run_equals_uninterrupted_run(mnist_dir, two_epoch_run, tmp_path):
    _, uninterrupted = two_epoch_run
    loop.train_and_evaluate(small_config(mnist_dir, 1), tmp_path)
    # Simulate a kill after the checkpoint but before the metrics line was written.
    (tmp_path / "metrics.jsonl").write_text("")
    resumed = loop.train_and_evaluate(small_config(mnist_dir, 2), tmp_path)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, uninterrupted.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, uninterrupted.opt_state)
    assert [r["epoch"] for r in metrics.read(tmp_path / "metrics.jsonl")] == [1, 2]


def test_refuses_to_resume_a_different_model(mnist_dir, two_epoch_run):
    workdir, _ = two_epoch_run
    config = small_config(mnist_dir, 3)
    config.model.channels = (8, 16, 32)
    with pytest.raises(ConfigError, match="--model-channels: 12,24,32 in that run, 8,16,32 here"):
        loop.train_and_evaluate(config, workdir)
