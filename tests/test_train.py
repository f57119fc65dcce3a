import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import conv_bn, dense_dropout, dense_lr_decay, dense_relu, linear
from mnist_jax import data, train, train_step

step = jax.jit(train_step)


def real_batch(mnist, n=64, start=0):
    x = data.normalize(mnist.train_images[start : start + n])
    return x, jnp.asarray(mnist.train_labels[start : start + n])


def test_train_step_changes_params_and_keeps_loss_finite(mnist):
    state = train.create_train_state(conv_bn.get_config(), jax.random.PRNGKey(0))
    new, metrics = step(state, real_batch(mnist), jax.random.PRNGKey(1))
    assert int(new.step) == 1
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    for old, updated in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        assert not np.allclose(old, updated)
    # batch norm statistics move too
    assert not np.allclose(
        state.batch_stats["BatchNorm_0"]["mean"], new.batch_stats["BatchNorm_0"]["mean"]
    )


def test_sgd_step_equals_the_analytic_softmax_gradient(mnist):
    """For logits = xW + b, d(mean CE)/dW = x^T (softmax - onehot) / B: check the whole update."""
    state = train.create_train_state(linear.get_config(), jax.random.PRNGKey(0))
    x, y = real_batch(mnist, 32)
    new, _ = step(state, (x, y), jax.random.PRNGKey(1))
    xf = np.asarray(x, np.float64).reshape(32, -1)
    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    logits = xf @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = (p - np.eye(10)[np.asarray(y)]) / 32
    np.testing.assert_allclose(new.params["Dense_0"]["kernel"], w - 0.01 * xf.T @ delta, atol=1e-6)
    np.testing.assert_allclose(new.params["Dense_0"]["bias"], b - 0.01 * delta.sum(0), atol=1e-6)


@pytest.mark.parametrize("stage", [dense_relu, conv_bn])
def test_overfits_a_tiny_batch(mnist, stage):
    config = stage.get_config()
    config.model.dropout = 0.0  # memorising needs every unit
    config.opt.lr = 0.001
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    batch = real_batch(mnist, 32)
    run = jax.jit(
        lambda s: jax.lax.fori_loop(
            0, 100, lambda i, s: step(s, batch, jax.random.PRNGKey(0))[0], s
        )
    )
    state = run(state)
    _, metrics = step(state, batch, jax.random.PRNGKey(0))
    assert metrics["accuracy"] == 1.0 and metrics["loss"] < 0.05


@pytest.mark.parametrize("stage,decay", [(dense_lr_decay, 0.6), (conv_bn, 0.666)])
def test_learning_rate_follows_the_codelab_schedule(mnist, stage, decay):
    """lr = 0.01 * decay^epoch, held for a whole epoch, and the logged value is the one used."""
    config = stage.get_config()
    steps_per_epoch = 3
    state = train.create_train_state(config, jax.random.PRNGKey(0), steps_per_epoch)
    batch = real_batch(mnist, 16)
    for s in range(4 * steps_per_epoch):
        state, metrics = step(state, batch, jax.random.PRNGKey(0))
        assert float(metrics["learning_rate"]) == pytest.approx(
            0.01 * decay ** (s // steps_per_epoch), rel=1e-6
        )


def test_dropout_keys_depend_on_step_not_on_calls(mnist):
    state = train.create_train_state(dense_dropout.get_config(), jax.random.PRNGKey(0))
    batch, rng = real_batch(mnist), jax.random.PRNGKey(3)
    a, _ = step(state, batch, rng)
    b, _ = step(state, batch, rng)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)  # same (rng, step): same masks
    c, _ = step(state.replace(step=state.step + 1), batch, rng)
    assert not np.allclose(a.params["Dense_0"]["kernel"], c.params["Dense_0"]["kernel"])


def test_evaluate_matches_a_direct_computation(mnist):
    state = train.create_train_state(dense_relu.get_config(), jax.random.PRNGKey(0))
    x, y = mnist.test_images[:2500], mnist.test_labels[:2500]  # not a multiple of the eval batch
    out = train.evaluate(state, x, y)
    logits = state.apply_fn({"params": state.params}, data.normalize(x), train=False)
    assert out["predictions"].shape == (2500,)
    np.testing.assert_array_equal(out["predictions"], np.argmax(logits, -1))
    assert float(out["accuracy"]) == pytest.approx(np.mean(np.argmax(logits, -1) == y))
    logp = jax.nn.log_softmax(logits)
    assert float(out["loss"]) == pytest.approx(float(-logp[np.arange(2500), y].mean()), rel=1e-5)
