import importlib

import jax
import numpy as np
import pytest

from mnist_jax import train

# Trainable parameters of each stage, as the codelab's Keras model.summary() counts them.
PARAMS = {
    "linear": 7_850,
    "dense_sigmoid": 169_670,
    "dense_relu": 169_670,
    "dense_fast_lr": 169_670,
    "dense_lr_decay": 169_670,
    "dense_deep": 183_770,
    "dense_dropout": 183_770,
    "conv": 354_002,
    "conv_dropout": 354_002,
    "conv_bn": 354_002,
    "conv_best": 694_402,  # beyond the codelab: four 3x3 convolutions, chosen on validation
}


def stage_config(name):
    return importlib.import_module(f"experiments.{name}").get_config()


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", PARAMS)
def test_parameter_counts(name):
    state = train.create_train_state(stage_config(name), jax.random.PRNGKey(0))
    assert count(state.params) == PARAMS[name]
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        np.zeros((3, 28, 28, 1), np.float32),
        train=False,
    )
    assert logits.shape == (3, 10)


# The codelab's section 10 building blocks as conv's flags: (flags, trainable params, of which
# in the head after the convolutions).
CONV_CONV = 3 * 3 * 1 * 12 + 12 + 6 * 6 * 12 * 24 + 24  # conv's first two layers
SECTION_10 = {
    "no hidden dense": (
        ["--model-dense", "0"],
        CONV_CONV + 6 * 6 * 24 * 32 + 32 + 7 * 7 * 32 * 10 + 10,
        7 * 7 * 32 * 10 + 10,
    ),  # fmt: skip
    # Global average pooling over a last convolution of 10 channels: its averages are the
    # logits, the head has 0 weights (the codelab's "0 weights").
    "pooling head": (
        ["--model-dense", "0", "--model-gap", "--model-channels", "12,24,10"],
        CONV_CONV + 6 * 6 * 24 * 10 + 10,
        0,
    ),  # fmt: skip
    "max pool, valid": (
        [
            "--model-kernels",
            "3,3,3",
            "--model-strides",
            "1,1,1",
            "--model-pool",
            "2,2,2",
            "--model-padding",
            "VALID",
        ],
        120 + 2616 + 6944 + 32 * 200 + 200 + 2010,
        32 * 200 + 200 + 2010,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", SECTION_10)
def test_section_10_building_blocks(name):
    from mnist_jax import flags

    argv, total, head = SECTION_10[name]
    config = flags.parse_config(stage_config("conv"), argv)
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    assert count(state.params) == total
    convs = sum(count(v) for k, v in state.params.items() if k.startswith("Conv"))
    assert total - convs == head
    logits = state.apply_fn({"params": state.params}, np.zeros((3, 28, 28, 1), np.float32), train=False)  # fmt: skip
    assert logits.shape == (3, 10)


def test_a_pooling_head_without_a_dense_layer_needs_a_channel_per_class():
    from mnist_jax import flags, models

    config = flags.parse_config(stage_config("conv"), ["--model-dense", "0", "--model-gap"])
    with pytest.raises(models.ConfigError, match="its channels must be the 10 classes, got --model-channels 12,24,32"):  # fmt: skip
        train.create_train_state(config, jax.random.PRNGKey(0))


def test_conv_bn_has_no_biases_and_keeps_batch_statistics():
    state = train.create_train_state(stage_config("conv_bn"), jax.random.PRNGKey(0))
    names = {"/".join(str(k.key) for k in path) for path, _ in jax.tree.leaves_with_path(state.params)}
    assert not any(n.startswith(("Conv", "Dense_0")) and n.endswith("bias") for n in names)
    assert not any(n.endswith("scale") for n in names)  # BatchNorm(center=True, scale=False)
    assert count(state.batch_stats) == 2 * (12 + 24 + 32 + 200)  # mean and var per channel


def test_glorot_uniform_kernels_and_zero_biases():
    state = train.create_train_state(stage_config("dense_relu"), jax.random.PRNGKey(0))
    kernel = np.asarray(state.params["Dense_0"]["kernel"])  # 784 x 200
    limit = np.sqrt(6 / (784 + 200))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit
    assert np.all(np.asarray(state.params["Dense_0"]["bias"]) == 0)


@pytest.mark.parametrize(
    "x_shape, k_shape",
    [
        ((4, 28, 28, 12), (6, 6, 12, 24)),
        ((3, 14, 14, 24), (6, 6, 24, 32)),
        ((2, 8, 6, 3), (2, 6, 3, 5)),
    ],
)
def test_conv_stride2_matches_lax_with_gradients(x_shape, k_shape):
    """The space-to-depth input gradient is the same function as lax's, only faster on CPU."""
    from jax import lax

    from mnist_jax import models

    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    k = rng.standard_normal(k_shape).astype(np.float32)

    def plain(x, k):
        return lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=models.NHWC)

    def loss(conv):
        return lambda x, k: (conv(x, k) ** 2 * np.arange(1, 1 + k_shape[-1])).sum()

    with jax.default_matmul_precision("highest"):  # float32 products, not a GPU's TF32
        np.testing.assert_allclose(models.conv_stride2(x, k), plain(x, k), rtol=1e-5, atol=1e-5)
        got = jax.grad(loss(models.conv_stride2), argnums=(0, 1))(x, k)
        want = jax.grad(loss(plain), argnums=(0, 1))(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3 * np.abs(w).max())


def test_conv_layers_take_the_stride2_path_when_asked(monkeypatch):
    from mnist_jax import models

    calls = []
    original = models.conv_stride2
    monkeypatch.setattr(models, "conv_stride2", lambda x, k: calls.append(x.shape) or original(x, k))
    x0 = np.zeros((2, 28, 28, 1), np.float32)
    init = lambda model: jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x0, train=False))  # noqa: E731
    init(models.build(**stage_config("conv_bn").model))
    assert calls == []  # by default, XLA's own convolution and gradient
    init(models.build(**stage_config("conv_bn").model, conv_grad="space_to_depth"))  # the stride-2 layers only
    assert calls == [(2, 28, 28, 12), (2, 14, 14, 24)]
    shifted = []
    monkeypatch.setattr(models, "conv_shifts", lambda x, k: shifted.append(k.shape) or models._conv_s1(x, k))
    init(models.build(**stage_config("conv_bn").model, conv_grad="shifts"))  # the CPU's: also the first layer
    assert shifted == [(3, 3, 1, 12)] and calls[2:] == [(2, 28, 28, 12), (2, 14, 14, 24)]
    # A 4x4 kernel pads half a block: the plain lax path, same values.
    x, k = np.ones((1, 8, 8, 1), np.float32), np.ones((4, 4, 1, 1), np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, models.NHWC)
    out = models.conv_on_cpu(x, k, (2, 2), "SAME", dimension_numbers=dn)
    assert len(calls) == 4 and out[0, 0, 0, 0] == 9 and out[0, 1, 1, 0] == 16


@pytest.mark.parametrize(
    "x_shape, k_shape", [((4, 28, 28, 1), (3, 3, 1, 12)), ((2, 9, 7, 1), (5, 3, 1, 4)), ((2, 6, 6, 1), (1, 1, 1, 3))]
)
def test_conv_shifts_matches_lax_with_gradients(x_shape, k_shape):
    """conv_grad shifts' first layer: the same function as lax's convolution, its gradients XLA's."""
    from jax import lax

    from mnist_jax import models

    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    k = rng.standard_normal(k_shape).astype(np.float32)
    plain = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=models.NHWC)  # noqa: E731
    loss = lambda conv: lambda x, k: (conv(x, k) ** 2 * np.arange(1, 1 + k_shape[-1])).sum()  # noqa: E731
    with jax.default_matmul_precision("highest"):
        # conv_bn's layer: 2.4e-7 of the largest output here (sums in another order), 6.3e-8 in profile_ops
        out, want = models.conv_shifts(x, k), plain(x, k)
        np.testing.assert_allclose(out, want, rtol=0, atol=2e-6 * np.abs(want).max())
        got = jax.grad(loss(models.conv_shifts), argnums=(0, 1))(x, k)
        want = jax.grad(loss(plain), argnums=(0, 1))(x, k)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("name, path", [(n, "shifts") for n in PARAMS] + [("conv_bn", "space_to_depth")])
def test_forward_mode_differentiates_every_stage_on_the_cpus_path(name, path):
    """jvp in the parameters and jacfwd in a batch of two images, on the paths the CPU takes
    (shifts by default, space-to-depth input gradients alone; asked for: the same path on every
    backend), agree with reverse mode."""
    import jax.numpy as jnp
    import optax

    config = stage_config(name)
    config.conv_grad = path
    state = train.create_train_state(config, jax.random.PRNGKey(0), 10)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 28, 28, 1)).astype(np.float32)
    labels = np.array([3, 7])
    tangent = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), state.params)

    def loss(params, images):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, _ = state.apply_fn(variables, images, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.PRNGKey(1)})  # fmt: skip
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit  # one program: op by op, forward mode over 1,568 input directions takes seconds
    def both_modes(params, images):
        along = jax.jvp(lambda p: loss(p, images), (params,), (tangent,))[1]
        grads = jax.grad(loss)(params, images)
        dot = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(tangent)))  # fmt: skip
        return along, dot, jax.jacfwd(loss, argnums=1)(params, images), jax.grad(loss, argnums=1)(params, images)  # fmt: skip

    with jax.default_matmul_precision("highest"):  # the modes' products in float32, not TF32
        along, dot, forward, reverse = both_modes(state.params, images)
    np.testing.assert_allclose(along, dot, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(forward, reverse, rtol=1e-3, atol=1e-6)
