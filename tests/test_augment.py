"""Augmentation on the device, in the step: random affine maps and elastic distortion."""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dense_relu
from mnist_jax import checkpoint, hooks, loop, plots, seeds, train

AUGMENT = (15.0, 0.1, 10.0, 20.0, 4.0)  # rotate, scale, shear (degrees, fraction), elastic alpha, sigma


def digits(mnist, n=4):
    return jnp.asarray(mnist.train_images[:n].astype(np.float32) / 256)


def test_the_identity_map_is_the_identity_and_a_quarter_turn_is_rot90(mnist):
    x, zero = digits(mnist), jnp.zeros(4)
    np.testing.assert_array_equal(train.warp(x, zero, jnp.ones(4), zero), x)  # bilinear at the pixels
    turned = train.warp(x, jnp.full(4, jnp.pi / 2), jnp.ones(4), zero)
    np.testing.assert_allclose(turned, np.rot90(np.asarray(x), k=-1, axes=(1, 2)), atol=1e-5)  # cos(pi/2) != 0
    # Twice as large about the centre (13.5, 13.5): pixel (13, 13) shows the image at (13.25, 13.25).
    big = np.asarray(train.warp(x, zero, jnp.full(4, 2.0), zero))[..., 0]
    i = np.asarray(x)[..., 0]
    at = 0.5625 * i[:, 13, 13] + 0.1875 * (i[:, 13, 14] + i[:, 14, 13]) + 0.0625 * i[:, 14, 14]
    np.testing.assert_allclose(big[:, 13, 13], at, atol=1e-6)


def test_each_draw_is_a_function_of_the_key_and_keeps_the_ink(mnist):
    x = digits(mnist)
    a, b = (train.random_warp(x, jax.random.PRNGKey(3), AUGMENT) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    other = train.random_warp(x, jax.random.PRNGKey(4), AUGMENT)
    assert not np.array_equal(a, other) and not np.array_equal(a, x)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= float(x.max()) + 1e-6
    # A digit moved and bent, not wiped out: most of its ink stays in the frame.
    assert 0.7 < float(a.sum() / x.sum()) < 1.3


def small(mnist_dir, epochs=2, **data):
    config = dense_relu.get_config()
    config.data.update(dir=str(mnist_dir), train_limit=640, test_limit=500, **data)
    config.update(epochs=epochs, plots=False, steps_per_call=1, log_every=1)
    return config


WARPED = dict(augment_rotate=15.0, augment_scale=0.1, augment_shear=10.0, augment_elastic=20.0)


def test_the_step_sees_the_labels_as_they_are_and_off_is_the_step_of_before(mnist):
    x, y = jax.device_put((mnist.train_images[:256], mnist.train_labels[:256]))
    order = jnp.arange(256, dtype=jnp.int32).reshape(2, 128)
    seen = lambda state, batch, rng: (state, {"loss": batch[1].sum().astype(jnp.float32), "x": batch[0].sum()})  # noqa: E731
    state = lambda: train.create_train_state(dense_relu.get_config(), jax.random.PRNGKey(0), 2)  # noqa: E731  (donated)
    args = (x, y, order, np.int32(0), jax.random.PRNGKey(1), 2)
    _, warped = train.train_steps(state(), *args, step=seen, augment=AUGMENT)
    _, plain = train.train_steps(state(), *args, step=seen)
    np.testing.assert_array_equal(warped["loss"], [y[:128].sum(), y[128:].sum()])  # labels untouched
    assert not np.array_equal(warped["x"], plain["x"])
    assert train.augmentation(dense_relu.get_config().data) == ()  # every stage: off


class StopAtStep(hooks.Hook):
    def after_steps(self, run, metrics):
        if run.step == 7:
            run.stop = signal.SIGTERM


def test_a_warped_run_resumes_bit_exactly_and_seeds_in_turn_are_their_runs_alone(mnist_dir, tmp_path):
    whole = loop.train(small(mnist_dir, **WARPED), [tmp_path / "whole"]).runs[0].state
    with pytest.raises(loop.Interrupted):
        loop.train(small(mnist_dir, **WARPED), [tmp_path / "split"], hooks=[StopAtStep()])
    resumed = loop.train(small(mnist_dir, **WARPED), [tmp_path / "split"]).runs[0].state
    for a, b in zip(jax.tree.leaves(checkpoint.items(whole)), jax.tree.leaves(checkpoint.items(resumed))):
        np.testing.assert_array_equal(a, b)
    plain = loop.train(small(mnist_dir), [tmp_path / "plain"]).runs[0].state
    assert not np.array_equal(plain.params["Dense_0"]["kernel"], whole.params["Dense_0"]["kernel"])
    # Seeds 0 and 1 in turn: seed 1 is bit for bit its run alone.
    config = small(mnist_dir, epochs=1, **WARPED)
    config.update(seeds=2, seed_mode="turn")
    seeds.train(config, tmp_path / "seeds", save=True, report=False)
    config.update(seeds=1, seed=1)
    alone = loop.train(config, [tmp_path / "alone"]).runs[0].state
    restored = checkpoint.restore(tmp_path / "seeds/seed_1").variables
    jax.tree.map(np.testing.assert_array_equal, restored["params"], jax.device_get(alone.params))
    # plots/augmented.png: the run's training images and their augmentation.
    paths = plots.draw_all(tmp_path / "whole")
    assert (tmp_path / "whole/plots/augmented.png") in paths
    assert (tmp_path / "whole/plots/augmented.png").stat().st_size > 1000


def test_vmapped_seeds_warp_as_their_runs_alone(mnist):
    """Three dense seeds vmapped with the warp on, 4 steps: each its run alone within the bound
    test_core states for vmapped seeds (here: bitwise on the CPU, a dense stage under YNNPACK's size)."""
    from tests.conftest import assert_same_or_close

    x, y = jax.device_put((mnist.train_images[:1024], mnist.train_labels[:1024]))
    config = dense_relu.get_config()
    orders = jnp.stack([jnp.asarray(np.random.default_rng(i).permutation(1024).reshape(8, 128), jnp.int32) for i in range(3)])  # noqa: E501
    rngs = jnp.stack([jax.random.PRNGKey(10 + i) for i in range(3)])
    states = lambda: [train.create_train_state(config, jax.random.PRNGKey(i), 8) for i in range(3)]  # noqa: E731
    group = loop.Group([config] * 3, ["a", "b", "c"], None, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)), {})  # noqa: E501
    together, m = train.train_seeds(group.put(states()), x, y, orders, np.int32(0), rngs, 4, augment=AUGMENT)
    for i, state in enumerate(states()):
        alone, mi = train.train_steps(state, x, y, orders[i], np.int32(0), rngs[i], 4, augment=AUGMENT)
        assert_same_or_close(group.take(i, together).params, alone.params, atol=0.005 * config.opt.lr)
        assert_same_or_close(m["loss"][i], mi["loss"], atol=2e-6)
