"""Optimizers, schedules and the loss by name, their numbers as data: shared programs, vmapped
rates."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import dense_relu
from mnist_jax import cli, loop, metrics, optim, parallel, startup, train
from tests.conftest import assert_same_or_close

RECIPES = {  # each optimizer once, each schedule once; clipping and label smoothing beside
    "sgd, Nesterov momentum, per-epoch decay": [
        "--opt-name",
        "sgd",
        "--opt-lr",
        "0.05",
        "--opt-momentum",
        "0.9",
        "--opt-nesterov",
        "--opt-decay",
        "0.5",
    ],  # fmt: skip
    "Keras's Adam, cosine with warm-up, clipped": [
        "--opt-name",
        "adam",
        "--opt-schedule",
        "cosine",
        "--opt-warmup",
        "0.25",
        "--opt-clip-norm",
        "1.0",
    ],  # fmt: skip
    "optax's Adam, constant, label smoothing": [
        "--opt-name",
        "optax_adam",
        "--opt-schedule",
        "constant",
        "--loss-label-smoothing",
        "0.1",
    ],  # fmt: skip
    "AdamW, one-cycle": [
        "--opt-name",
        "adamw",
        "--opt-weight-decay",
        "0.01",
        "--opt-schedule",
        "onecycle",
    ],  # fmt: skip
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_optimizer_and_schedule_trains_and_logs_the_rate_it_used(recipe, mnist_dir, tmp_path):
    args = ["--epochs", "2", "--data-train-limit", "1280", "--data-test-limit", "500",
            "--log-every", "1", "--plots", "false", "--data-dir", str(mnist_dir),
            "--workdir", str(tmp_path), *RECIPES[recipe]]  # fmt: skip
    config = cli.flags.parse_config(dense_relu.get_config(), list(args))
    cli.run(dense_relu.get_config, args)
    steps = metrics.read(tmp_path / "train_steps.jsonl")
    rows = metrics.read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 21)) and len(rows) == 2
    assert rows[-1]["train_loss"] < steps[0]["loss"]  # it learns
    opt = config.opt
    curve = optim.shape(opt.schedule, opt.decay, opt.warmup, 10, 2)
    expected = [opt.lr * float(curve(r["step"] - 1)) for r in steps]  # each step's own rate
    np.testing.assert_allclose([r["learning_rate"] for r in steps], expected, rtol=1e-5)  # float32


def small_config(**opt):
    config = dense_relu.get_config()
    config.opt.update(**opt)
    return config


def states_for(configs, x):
    return [train.create_train_state(c, jax.random.PRNGKey(0), 16) for c in configs]


@pytest.fixture(scope="module")
def batches(mnist):
    x, y = jax.device_put((mnist.train_images[:2048], mnist.train_labels[:2048]))
    order = jnp.asarray(np.random.default_rng(0).permutation(2048).reshape(16, 128), jnp.int32)
    return x, y, order


def test_runs_that_differ_only_in_their_numbers_share_one_program(batches):
    """Learning rate, weight decay and label smoothing are data: the second run compiles
    nothing; another optimizer is another program."""
    x, y, order = batches
    # A function of its own, so its cache counts from zero: jit caches by function, and other
    # tests in this process may have jitted train.train_step itself.
    step = jax.jit(lambda state, batch, rng: train.train_step(state, batch, rng))
    adamw = dict(name="adamw", weight_decay=1e-4, schedule="onecycle")  # at step 1: lr / 25
    configs = [small_config(lr=0.01, **adamw), small_config(lr=0.003, **adamw), small_config(lr=0.003, **{**adamw, "weight_decay": 1e-2})]  # fmt: skip
    configs[2].loss.label_smoothing = 0.1
    losses = []
    for config, state in zip(configs, states_for(configs, x)):
        batch = (x[order[0]] / 256.0, y[order[0]])
        new, m = step(state, batch, jax.random.PRNGKey(1))
        losses.append(float(m["loss"]))
        # The rate this step used: each run's own lr (data, not the program) on the schedule.
        o = config.opt
        curve = optim.shape(o.schedule, o.decay, o.warmup, 16, config.epochs)
        assert float(m["learning_rate"]) == pytest.approx(o.lr * float(curve(0)), rel=1e-6)
    assert step._cache_size() == 1
    assert len(set(losses)) == 2  # the same batch, weights: label smoothing changes the loss
    step(states_for([small_config(lr=0.01, name="sgd")], x)[0], batch, jax.random.PRNGKey(1))
    assert step._cache_size() == 2


def test_a_vmapped_learning_rate_trains_what_the_single_run_with_it_trains(batches):
    """Members with rates 0.001 and 0.003 in one vmapped program: each the run with its rate
    alone (bitwise for a dense stage on the CPU, as vmapped seeds are)."""
    x, y, order = batches
    configs = [small_config(lr=lr) for lr in (0.001, 0.003)]
    states = states_for(configs, x)
    group = loop.Group(configs, ["a", "b"], startup.resolve(configs[0], 2), parallel.make_mesh(1), {})
    rngs = jnp.stack([jax.random.PRNGKey(5)] * 2)
    orders = jnp.stack([order] * 2)
    together, m = train.train_seeds(group.put(states), x, y, orders, np.int32(0), rngs, 8)
    for i, config in enumerate(configs):
        alone, mi = train.train_steps(states[i], x, y, order, np.int32(0), rngs[i], 8)
        # Bitwise on the CPU; elsewhere a vmapped program may round otherwise: within the CPU's
        # measured gap for 5 vmapped seeds (losses 7e-5 apart by step 7, test_core), and each
        # weight within one step of the larger rate (Adam's step is at most about lr).
        assert_same_or_close(m["loss"][i], mi["loss"], atol=1e-4)
        assert_same_or_close(group.take(i, together).params, alone.params, atol=0.003)
        np.testing.assert_array_equal(m["learning_rate"][i], mi["learning_rate"])
        assert float(mi["learning_rate"][-1]) == pytest.approx(config.opt.lr)
    assert not np.array_equal(m["loss"][0], m["loss"][1])


def test_a_bad_optimizer_setting_is_one_line():
    from mnist_jax.config import ConfigError, validate

    for opt, message in (
        (
            dict(name="adam", weight_decay=0.01),
            "--opt-weight-decay: decays weights with --opt-name adamw only",
        ),  # fmt: skip
        (dict(nesterov=True), "--opt-nesterov: needs --opt-momentum"),
        (dict(name="adam", momentum=0.9), "--opt-momentum: is sgd's; the adams have their own"),
        (dict(schedule="cosine", warmup=1.0), "--opt-warmup: must be a fraction of the run"),
        (dict(clip_norm=-1.0), "--opt-clip-norm: must be 0 (off) or positive"),
    ):
        config = ml_collections.ConfigDict(small_config(**opt).to_dict())
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            validate(config)
