import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import conv_bn, dense_dropout, dense_lr_decay, dense_relu, linear
from mnist_jax import data, models, optim, train, train_step
from tests.conftest import assert_same_or_close

step = jax.jit(train_step)


def real_batch(mnist, n=64, start=0):
    x = data.normalize(mnist.train_images[start : start + n])
    return x, jnp.asarray(mnist.train_labels[start : start + n])


def test_train_step_changes_params_and_keeps_loss_finite(mnist):
    state = train.create_train_state(conv_bn.get_config(), jax.random.PRNGKey(0))
    new, metrics = step(state, real_batch(mnist), jax.random.PRNGKey(1))
    assert int(new.step) == 1
    assert np.isfinite(metrics["loss"])  # the step's accuracy and loss: the analytic test below
    for old, updated in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        assert not np.allclose(old, updated)
    # batch norm statistics move too
    assert not np.allclose(state.batch_stats["BatchNorm_0"]["mean"], new.batch_stats["BatchNorm_0"]["mean"])


def test_initial_variables_are_those_of_model_init():
    """create_train_state compiles model.init as one program; it must draw the same weights as
    Flax's op-by-op init (the README's seed results were trained from those). conv_bn has every
    kind of layer the stages use."""
    config, rng = conv_bn.get_config(), jax.random.PRNGKey(3)
    model = models.build(**config.model, dtype="float32")
    expected = model.init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)
    state = train.create_train_state(config, rng)
    # Two programs: bitwise on the CPU; elsewhere the scaling of the same random bits may fuse
    # otherwise, a few float32 ulps.
    assert_same_or_close(expected["params"], state.params, atol=0, rtol=1e-6)
    assert_same_or_close(expected.get("batch_stats", {}), state.batch_stats, atol=0, rtol=1e-6)


def test_sgd_step_equals_the_analytic_softmax_gradient(mnist):
    """For logits = xW + b, d(mean CE)/dW = x^T (softmax - onehot) / B: check the whole update."""
    state = train.create_train_state(linear.get_config(), jax.random.PRNGKey(0))
    x, y = real_batch(mnist, 32)
    with jax.default_matmul_precision("highest"):  # float32 products, not a GPU's TF32
        new, m = step(state, (x, y), jax.random.PRNGKey(1))
    xf = np.asarray(x, np.float64).reshape(32, -1)
    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    logits = xf @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # The step's metrics are of the weights before it: the batch's hits and mean cross-entropy.
    assert float(m["accuracy"]) == np.mean(logits.argmax(1) == np.asarray(y))
    assert float(m["loss"]) == pytest.approx(-np.log(p[np.arange(32), np.asarray(y)]).mean(), rel=1e-5)  # fmt: skip
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
    # A Python loop of jitted steps: XLA:CPU runs convolutions inside a fori_loop body several
    # times slower (jax-ml/jax#12868).
    for _ in range(100):
        state, _ = step(state, batch, jax.random.PRNGKey(0))
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
        assert float(metrics["learning_rate"]) == pytest.approx(0.01 * decay ** (s // steps_per_epoch), rel=1e-6)


def test_dropout_keys_depend_on_step_not_on_calls(mnist):
    state = train.create_train_state(dense_dropout.get_config(), jax.random.PRNGKey(0))
    batch, rng = real_batch(mnist), jax.random.PRNGKey(3)
    a, _ = step(state, batch, rng)
    b, _ = step(state, batch, rng)
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)  # same (rng, step): same masks
    c, _ = step(state.replace(step=state.step + 1), batch, rng)
    assert not np.allclose(a.params["Dense_0"]["kernel"], c.params["Dense_0"]["kernel"])


def test_eval_dataset_matches_a_direct_computation(mnist):
    state = train.create_train_state(dense_relu.get_config(), jax.random.PRNGKey(0))
    x, y = mnist.test_images[:2500], mnist.test_labels[:2500]  # not a multiple of the eval batch
    out = train.eval_dataset(state, x, y)
    logits = state.apply_fn({"params": state.params}, data.normalize(x), train=False)
    assert out["predictions"].shape == (2500,)
    np.testing.assert_array_equal(out["predictions"], np.argmax(logits, -1))
    assert float(out["accuracy"]) == pytest.approx(np.mean(np.argmax(logits, -1) == y))
    logp = jax.nn.log_softmax(logits)
    assert float(out["loss"]) == pytest.approx(float(-logp[np.arange(2500), y].mean()), rel=1e-5)


def test_onecycle_schedule_warms_up_then_anneals():
    from mnist_jax import config as config_lib

    opt = config_lib.base().opt
    opt.update(name="adam", lr=0.01, schedule="onecycle")
    tx = optim.optimizer(opt, steps_per_epoch=100, epochs=3)
    params = {"w": jax.numpy.zeros(3)}
    state = tx.init(params)
    lrs = []
    for _ in range(300):
        _, state = tx.update({"w": jax.numpy.ones(3)}, state, params)
        lrs.append(float(optim.learning_rate(state)))
    assert lrs[0] == pytest.approx(0.01 / 25, rel=1e-3)  # first update: the start of the warm-up
    assert max(lrs) == pytest.approx(0.01, rel=1e-3) and 55 <= int(np.argmax(lrs)) <= 60
    assert lrs[-1] == pytest.approx(0.01 / 1000, rel=0.05)


def test_bfloat16_computes_in_bf16_with_float32_parameters(mnist):
    config = conv_bn.get_config()
    x = data.normalize(mnist.train_images[:64])
    y = mnist.train_labels[:64]
    states, losses = {}, {}
    for dtype in ("float32", "bfloat16"):
        config.dtype = dtype
        states[dtype] = train.create_train_state(config, jax.random.PRNGKey(0), 937)
        step = jax.jit(train_step)
        s, m = step(states[dtype], (x, y), jax.random.PRNGKey(1))
        losses[dtype] = float(m["loss"])
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(s.params))
    jaxpr = str(jax.make_jaxpr(train_step)(states["bfloat16"], (x, y), jax.random.PRNGKey(1)))
    assert "conv_general_dilated" in jaxpr and "bf16[64,28,28,12]" in jaxpr
    assert "bf16" not in str(jax.make_jaxpr(train_step)(states["float32"], (x, y), jax.random.PRNGKey(1)))  # fmt: skip
    assert np.isfinite(losses["bfloat16"])
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)


def test_random_shift_translates_each_image_within_bounds(mnist):
    x = np.asarray(data.normalize(mnist.train_images[:512]))
    # Keep digits with an empty 2-pixel frame: a shift of up to 2 then loses no stroke.
    frame = np.ones((28, 28), bool)
    frame[2:-2, 2:-2] = False
    x = x[~(x[..., 0] * frame).any(axis=(1, 2))]
    assert len(x) > 400
    out = np.asarray(train.random_shift(x, jax.random.PRNGKey(0), 2))
    assert out.shape == x.shape
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), x.sum(axis=(1, 2, 3)), rtol=1e-5)
    moved = [
        next((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
             if np.array_equal(np.roll(x[i], (dy, dx), axis=(0, 1)), out[i]))
        for i in range(len(x))
    ]  # fmt: skip
    assert len(set(moved)) == 25  # every offset of the 5x5 window is drawn
    np.testing.assert_array_equal(out, train.random_shift(x, jax.random.PRNGKey(0), 2))


def test_eval_dataset_counts_accuracy_exactly():
    """9,950 right of 10,000 is 99.5%, not 99.49999%: a float32 mean would miss the target."""
    import optax

    def always_zero(variables, images, train, mutable=False):  # as a flax Module.apply
        logits = jnp.zeros((images.shape[0], 10)).at[:, 0].set(1.0)
        return (logits, {}) if mutable else logits

    state = train.TrainState.create(apply_fn=always_zero, params={}, batch_stats={}, tx=optax.identity())  # fmt: skip
    labels = np.r_[np.zeros(9950, np.int32), np.ones(50, np.int32)]
    images = np.zeros((10_000, 28, 28, 1), np.uint8)
    out = train.eval_dataset(state, images, labels)
    assert float(out["accuracy"]) >= 0.995
    assert int((out["predictions"] == labels).sum()) == 9950
