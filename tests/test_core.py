"""The compiled training core: K steps in one call, N seeds in one vmapped program, --seeds N."""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mnist_jax
from experiments import dense_dropout, dense_relu
from mnist_jax import cli, evaluate, loop, metrics, parallel, startup, train
from tests.conftest import assert_runs_alike

STAGES = ["linear", "dense_sigmoid", "dense_relu", "dense_lr_decay", "dense_dropout", "conv",
          "conv_dropout", "conv_bn"]  # fmt: skip


@pytest.fixture(scope="module")
def arrays(mnist):
    return jax.device_put((mnist.train_images[:2048], mnist.train_labels[:2048]))


def order_for(batch: int, steps: int, seed: int = 0) -> jax.Array:
    idx = np.random.default_rng(seed).permutation(2048)[: steps * batch]
    return jnp.asarray(idx.reshape(steps, batch), jnp.int32)


def rel_diff(a, b) -> float:
    """Largest difference over the leaves of a and b, relative to each leaf's largest value."""
    return max(
        (
            float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        ),  # fmt: skip
        default=0.0,
    )


def k_steps_and_single_steps(config, arrays, k):
    x, y = arrays
    b = config.batch_size
    order, rng = order_for(b, k), jax.random.PRNGKey(3)
    state = train.create_train_state(config, jax.random.PRNGKey(0), 16)
    copy = lambda: jax.tree.map(jnp.copy, state)  # noqa: E731  (the calls donate the state)
    one, losses = copy(), []
    for i in range(k):
        one, m = train.train_steps(one, x, y, order, np.int32(i), rng, 1)
        losses.append(m["loss"])
    many, m = train.train_steps(copy(), x, y, order, np.int32(0), rng, k, unroll=jax.default_backend() == "cpu")
    return one, np.concatenate(losses), many, np.asarray(m["loss"])


# K steps of a stage in one call against single steps, run by run: test_steps_per_call_keeps_the_run_and_its_logs.
def test_k_steps_in_one_call_match_single_steps_for_conv_bn(arrays):
    config = importlib.import_module("experiments.conv_bn").get_config()
    one, l1, many, l2 = k_steps_and_single_steps(config, arrays, 8)
    d = np.concatenate([np.abs(np.ravel(u - v)) for u, v in zip(jax.tree.leaves(many.params), jax.tree.leaves(one.params))])  # fmt: skip
    if jax.default_backend() == "cpu":
        # Unrolled (the CPU's K steps a call), the steps round differently, by a few last bits. Measured
        # after 8 steps: weights 8.1e-7 apart at most (lr 0.01), batch-norm statistics 3.7e-7 relative,
        # losses 1.2e-7; 2.2e-7, 1.2e-7 and 0 after 3.
        assert d.max() < 1e-4
        assert rel_diff(many.batch_stats, one.batch_stats) < 1e-5
        np.testing.assert_allclose(l2, l1, atol=1e-5)
        return
    # A loop body's convolutions are compiled differently, and Adam turns a float difference in a
    # near-zero gradient into up to a whole lr-sized step of that weight. Measured on the CPU (a
    # loop there, before it unrolled), after 3 steps: losses 7.4e-5 apart at most; 0.12% of the
    # weights more than 0.1 lr apart; batch-norm statistics 8e-4 relative.
    assert (d > 0.1 * config.opt.lr).mean() < 0.01
    assert rel_diff(many.batch_stats, one.batch_stats) < 0.01
    np.testing.assert_allclose(l2, l1, atol=5e-4)


def vmapped_and_alone(config, arrays, n):
    """One step from the same states: n seeds vmapped, then each alone. Per seed: (its params
    vmapped, alone, its loss vmapped, alone)."""
    x, y = arrays
    b = config.batch_size
    states = [train.create_train_state(config, jax.random.PRNGKey(i), 16) for i in range(n)]
    orders = jnp.stack([order_for(b, 2, seed=i) for i in range(n)])
    rngs = jnp.stack([jax.random.PRNGKey(10 + i) for i in range(n)])
    group = loop.Group([config] * n, [f"seed_{i}" for i in range(n)], startup.resolve(config, n), parallel.make_mesh(1), {})  # fmt: skip
    together, m = train.train_seeds(group.put(states), x, y, orders, np.int32(0), rngs, 1)
    for i in range(n):
        alone, mi = train.train_steps(states[i], x, y, orders[i], np.int32(0), rngs[i], 1)
        yield group.take(i, together).params, alone.params, m["loss"][i], mi["loss"]


# One step from the same states, vmapped against each seed alone (measured, CPU): with 3 seeds
# the dense stages are bitwise their steps alone (every operation of batch 128 stays under
# XLA:CPU's YNNPACK size threshold: train_seeds; the whole runs of test_seeds show it), with 5
# past it: losses 2.4e-7 apart at most, weights 2.5e-4 lr (Adam turns a last-bit change in a
# near-zero gradient into a larger one of the step). 3 conv seeds: conv, conv_dropout 6e-7
# relative; conv_bn 8.4e-5 absolute, under 1% of Adam's lr 0.01 step (batch norm's beta starts at
# 0, so relative figures mean little there). The bounds hold for any backend's rounding order.
@pytest.mark.parametrize("stage", STAGES)
def test_a_vmapped_seed_takes_the_step_of_that_seed_alone(stage, arrays):
    config = importlib.import_module(f"experiments.{stage}").get_config()
    conv = stage.startswith("conv")
    for params, alone, loss, loss_alone in vmapped_and_alone(config, arrays, 3 if conv else 5):
        if not conv:
            jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=0, atol=0.005 * config.opt.lr), params, alone)  # fmt: skip
            np.testing.assert_allclose(loss, loss_alone, rtol=0, atol=2e-6)
            continue
        diff = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(alone)))  # fmt: skip
        assert diff < 0.05 * config.opt.lr
        np.testing.assert_allclose(loss, loss_alone, rtol=1e-5)


def stage_run(get_config, mnist_dir, workdir, *extra):
    cli.run(get_config, ["--epochs", "2", "--data-train-limit", "2560", "--data-test-limit", "2000",
            "--plots", "false", "--data-dir", str(mnist_dir), "--workdir", str(workdir), *extra])  # fmt: skip


def test_three_seeds_write_three_restorable_runs_and_their_spread(mnist_dir, tmp_path, capsys):
    stage_run(dense_relu.get_config, mnist_dir, tmp_path, "--seeds", "3", "--seed", "4")
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [4, 5, 6] and summary["mode"] == "vmap"  # auto: dense, any backend
    finals = []
    for seed in (4, 5, 6):
        workdir = tmp_path / f"seed_{seed}"
        rows = metrics.read(workdir / "metrics.jsonl")
        assert [r["epoch"] for r in rows] == [1, 2]
        assert json.loads((workdir / "config.json").read_text())["seed"] == seed
        assert mnist_jax.restore(workdir).step == 2 * 2560 // 128
        finals.append(rows[-1]["test_accuracy"])
        assert f"seed {seed}: final test {finals[-1]:.2%}" in out
    assert len(set(finals)) == 3  # three draws, not one run three times
    final = summary["test_accuracy"]
    assert final["median"] == sorted(finals)[1] and final["min"] == min(finals)
    assert final["mean"] == pytest.approx(np.mean(finals))
    assert final["std"] == pytest.approx(np.std(finals, ddof=1))
    assert "dense_relu over 3 seeds (vmap): final" in out

    # Seed 5's directory is a single run to the commands that read one.
    evaluate.main(["--workdir", str(tmp_path / "seed_5")])
    assert f"{finals[1]:.2%}" in capsys.readouterr().out
    # Each vmapped seed is the run `--seed s` trains: test_seeds (experiments.seeds, the same
    # seeds.train).


def test_five_seeds_in_turn_are_their_runs_alone(mnist_dir, tmp_path):
    # In turn: each seed bit for bit its run alone, whatever N: the same program, on any backend.
    # 2 epochs of 10 steps, each logged. (Vmapped seeds against alone: above, and test_seeds.)
    small = ["--data-train-limit", "1280", "--data-test-limit", "500", "--log-every", "1"]
    stage_run(dense_dropout.get_config, mnist_dir, tmp_path / "turn", "--seeds", "5", *small, "--seed-mode", "turn")  # fmt: skip
    stage_run(dense_dropout.get_config, mnist_dir, tmp_path / "one", "--seed", "3", *small)
    a, b = mnist_jax.restore(tmp_path / "one"), mnist_jax.restore(tmp_path / "turn" / "seed_3")
    jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
    rows = lambda d: [{k: v for k, v in r.items() if k != "seconds"} for r in metrics.read(d / "train_steps.jsonl")]  # noqa: E731  # fmt: skip
    assert len(rows(tmp_path / "one")) == 20 and rows(tmp_path / "one") == rows(tmp_path / "turn" / "seed_3")  # fmt: skip


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's choice: a GPU's is the whole epoch")
def test_a_cpu_run_that_repays_compiling_them_takes_unrolled_calls(mnist_dir, tmp_path, monkeypatch):
    """--steps-per-call 0 on the CPU: a conv net 8 steps a call from startup.UNROLL_REPAID steps in the run,
    recorded in config_history.jsonl; one a call below, and a dense net's always."""
    calls, real, repaid = [], loop.Group.train, 64  # for the test: 2,000 steps, where the rule is measured
    monkeypatch.setattr(loop.Group, "train", lambda self, *a: calls.append(a[-1]) or real(self, *a))
    monkeypatch.setattr(startup, "UNROLL_REPAID", repaid)
    for stage, n in (("conv", repaid - 1), ("conv", repaid), ("linear", 128)):
        calls.clear()
        work = tmp_path / f"{stage}{n}"  # batch 1, an epoch: n steps
        cli.run(importlib.import_module(f"experiments.{stage}").get_config, ["--epochs", "1", "--batch-size", "1",
                "--data-train-limit", str(n), "--data-test-limit", "100", "--plots", "false",
                "--data-dir", str(mnist_dir), "--workdir", str(work)])  # fmt: skip
        k = startup.CPU_STEPS_PER_CALL if stage == "conv" and n >= repaid else 1
        assert calls == [k] * (n // k) and sum(calls) == n
        assert metrics.read(work / "config_history.jsonl")[-1]["runtime"]["steps_per_call"] == k


def test_steps_per_call_keeps_the_run_and_its_logs(mnist_dir, tmp_path):
    """K = 7 does not divide the 20-step epoch, nor the log or checkpoint steps."""
    stage_run(dense_dropout.get_config, mnist_dir, tmp_path / "k1", "--log-every", "5", "--steps-per-call", "1")
    stage_run(dense_dropout.get_config, mnist_dir, tmp_path / "k7", "--log-every", "5", "--steps-per-call", "7", "--checkpoint-every", "6")  # fmt: skip
    # On the CPU the 7 steps are unrolled, another program: the same rows up to float rounding.
    assert_runs_alike(tmp_path / "k1", tmp_path / "k7", bitwise=False)
    rows = [metrics.read(tmp_path / k / "train_steps.jsonl") for k in ("k1", "k7")]
    assert [r["step"] for r in rows[1]][:4] == [5, 10, 15, 20]
    worst = max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(*rows) for k in ("loss", "accuracy") if a[k])
    assert worst < 1e-4  # rounding, not another recipe: measured 1.2e-7 over the 40 steps (2-core CPU)
