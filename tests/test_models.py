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
    "dense_lr_decay": 169_670,
    "dense_dropout": 183_770,
    "conv": 354_002,
    "conv_dropout": 354_002,
    "conv_bn": 354_002,
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


def test_conv_bn_has_no_biases_and_keeps_batch_statistics():
    state = train.create_train_state(stage_config("conv_bn"), jax.random.PRNGKey(0))
    names = {
        "/".join(str(k.key) for k in path) for path, _ in jax.tree.leaves_with_path(state.params)
    }
    assert not any(n.startswith(("Conv", "Dense_0")) and n.endswith("bias") for n in names)
    assert not any(n.endswith("scale") for n in names)  # BatchNorm(center=True, scale=False)
    assert count(state.batch_stats) == 2 * (12 + 24 + 32 + 200)  # mean and var per channel


def test_glorot_uniform_kernels_and_zero_biases():
    state = train.create_train_state(stage_config("dense_relu"), jax.random.PRNGKey(0))
    kernel = np.asarray(state.params["Dense_0"]["kernel"])  # 784 x 200
    limit = np.sqrt(6 / (784 + 200))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit
    assert np.all(np.asarray(state.params["Dense_0"]["bias"]) == 0)
