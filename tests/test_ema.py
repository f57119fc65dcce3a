"""--opt-ema: a moving average of the weights, kept in the training state, evaluated and published."""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dense_relu
from mnist_jax import checkpoint, evaluate, hooks, loop, metrics, parallel, sweep, train
from mnist_jax.config import ConfigError


def small(mnist_dir, ema=0.9, epochs=2):
    config = dense_relu.get_config()
    config.data.update(dir=str(mnist_dir), train_limit=640, test_limit=500)
    config.update(epochs=epochs, plots=False, steps_per_call=1, log_every=1)
    config.opt.ema = ema
    return config


def test_off_the_state_and_its_checkpoint_are_as_before():
    state = train.create_train_state(dense_relu.get_config(), jax.random.PRNGKey(0))
    assert state.ema is None
    trees = checkpoint.items(state)
    assert set(trees["train"]) == {"opt_state", "step", "loss_args"}  # the layout-3 item of before
    assert trees["model"]["params"] is state.params


def test_the_average_steps_with_a_decay_warmed_up_from_the_first_step(mnist):
    config = dense_relu.get_config()
    config.opt.ema = 0.5
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    x = mnist.train_images[:128].astype(np.float32) / 255
    batch = (jnp.asarray(x), jnp.asarray(mnist.train_labels[:128]))
    average = state.ema["params"]
    for t in range(12):  # decay min(0.5, (1 + t) / (10 + t)): 0.1, 0.18, ..., then 0.5 from t = 8
        new, _ = train.train_step(state, batch, jax.random.PRNGKey(1))
        d = min(0.5, (1 + t) / (10 + t))
        expected = jax.tree.map(lambda n, a: (1 - d) * np.asarray(n) + d * np.asarray(a), new.params, average)  # noqa: B023
        jax.tree.map(
            lambda e, got: np.testing.assert_allclose(got, e, rtol=1e-5, atol=1e-7), expected, new.ema["params"]
        )  # noqa: E501
        state, average = new, new.ema["params"]
    assert not np.array_equal(state.ema["params"]["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])


class StopAtStep(hooks.Hook):
    def __init__(self, step):
        self.step = step

    def after_steps(self, run, metrics):
        if run.step == self.step:
            run.stop = signal.SIGTERM  # what hooks.Preemption sets when a signal comes


def test_a_run_stopped_mid_epoch_resumes_bit_exactly_and_publishes_the_average(mnist_dir, tmp_path):
    whole = loop.train(small(mnist_dir), [tmp_path / "whole"]).runs[0].state
    with pytest.raises(loop.Interrupted):
        loop.train(small(mnist_dir), [tmp_path / "split"], hooks=[StopAtStep(7)])  # 5 steps an epoch
    assert checkpoint.steps(tmp_path / "split")[0] == 7
    resumed = loop.train(small(mnist_dir), [tmp_path / "split"]).runs[0].state
    for a, b in zip(jax.tree.leaves(checkpoint.items(whole)), jax.tree.leaves(checkpoint.items(resumed))):
        np.testing.assert_array_equal(a, b)
    # The published model is the average: evaluate reads it and gets the logged test accuracy.
    result = evaluate.evaluate_checkpoint(tmp_path / "split")
    assert result["accuracy"] == metrics.read(tmp_path / "split/metrics.jsonl")[-1]["test_accuracy"]
    assert result["weights"] == "the weights' moving average (--opt-ema 0.9)"
    restored = checkpoint.restore(tmp_path / "split")
    np.testing.assert_array_equal(
        restored.variables["params"]["Dense_0"]["kernel"], resumed.ema["params"]["Dense_0"]["kernel"]
    )  # noqa: E501
    assert not np.array_equal(restored.variables["params"]["Dense_0"]["kernel"], resumed.params["Dense_0"]["kernel"])


def test_runs_trained_together_may_differ_in_the_decay_not_in_whether_it_is_on():
    config = dense_relu.get_config()
    given = [loop.with_values(config, {"opt.ema": d}) for d in (0.99, 0.999)]
    assert [c.opt.ema for c in loop.member_configs(config, given, 2)] == [0.99, 0.999]
    with pytest.raises(ConfigError, match="opt.ema on"):
        loop.member_configs(config, [loop.with_values(config, {"opt.ema": d}) for d in (0.0, 0.99)], 2)
    assert sweep.batchable(sweep.parse_space(["opt.ema=uniform(0.99,0.999)"], config))
    assert not sweep.batchable(sweep.parse_space(["opt.ema=choice(0.0,0.999)"], config))


def test_vmapped_decays_each_average_as_its_run_alone(mnist):
    """Decays 0.2 and 0.5 in one vmapped program (apart from step 2: the warm-up caps both before): each member's average is its run's alone
    (bitwise for a dense stage on the CPU, as vmapped rates are: tests/test_optim.py)."""
    from tests.conftest import assert_same_or_close

    x, y = jax.device_put((mnist.train_images[:2048], mnist.train_labels[:2048]))
    order = jnp.asarray(np.random.default_rng(0).permutation(2048).reshape(16, 128), jnp.int32)
    configs = [loop.with_values(dense_relu.get_config(), {"opt.ema": d}) for d in (0.2, 0.5)]
    states = [train.create_train_state(c, jax.random.PRNGKey(0), 16) for c in configs]
    group = loop.Group(configs, ["a", "b"], None, parallel.make_mesh(1), {})
    rngs, orders = jnp.stack([jax.random.PRNGKey(5)] * 2), jnp.stack([order] * 2)
    together, _ = train.train_seeds(group.put(states), x, y, orders, np.int32(0), rngs, 8)
    for i, state in enumerate(states):
        alone, _ = train.train_steps(state, x, y, order, np.int32(0), rngs[i], 8)
        assert_same_or_close(group.take(i, together).ema, alone.ema, atol=1e-4)
    assert not np.array_equal(
        together.ema["params"]["Dense_0"]["kernel"][0], together.ema["params"]["Dense_0"]["kernel"][1]
    )  # noqa: E501


def test_the_stage_command_takes_the_flag_and_evaluate_says_which_weights(mnist_dir, tmp_path, capsys):
    from mnist_jax import cli

    args = ["--opt-ema", "0.99", "--epochs", "1", "--data-dir", str(mnist_dir), "--data-train-limit", "640",
            "--data-test-limit", "500", "--plots", "false", "--workdir", str(tmp_path)]  # fmt: skip
    cli.run(dense_relu.get_config, args)
    capsys.readouterr()
    evaluate.main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    accuracy = metrics.read(tmp_path / "metrics.jsonl")[-1]["test_accuracy"]
    assert f"test accuracy {accuracy:.2%} (500 images)" in out and "the weights' moving average (--opt-ema 0.99)" in out
