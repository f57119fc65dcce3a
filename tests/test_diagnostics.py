"""Diagnostics of a run that does not learn: a collapse to one class, dead ReLU units."""

import jax
import numpy as np

from experiments import conv, dense_relu
from mnist_jax import data, diagnostics, train


def test_collapsed_to_names_the_only_class_predicted():
    assert diagnostics.collapsed_to(np.array([3, 3, 3])) == 3
    assert diagnostics.collapsed_to(np.array([3, 3, 1])) is None


def test_dead_units_counts_relus_that_are_zero_on_every_image(mnist):
    state = train.create_train_state(conv.get_config(), jax.random.PRNGKey(0))
    images = mnist.test_images[:1500]  # two chunks of dead_units' 1,000
    before = diagnostics.dead_units(state, images)
    assert {k: n for k, (_, n) in before.items()} == {
        "hidden_0": 12, "hidden_1": 24, "hidden_2": 32, "hidden_3": 200
    }  # fmt: skip
    # Kill conv channel 5 of the first layer: no input weight, a negative bias.
    params = jax.tree.map(lambda x: x, state.params)
    params["Conv_0"] = {
        "kernel": params["Conv_0"]["kernel"].at[..., 5].set(0.0),
        "bias": params["Conv_0"]["bias"].at[5].set(-1.0),
    }
    after = diagnostics.dead_units(state.replace(params=params), images)
    assert after["hidden_0"][0] == before["hidden_0"][0] + 1


def test_dead_units_count_real_images_only(mnist):
    # eval_dataset pads 1,500 images to 2,000 with blank ones, which must not count. Unit 7 of
    # dense_relu's first layer is made to fire on a blank image only: every weight -1, bias 0.01.
    state = train.create_train_state(dense_relu.get_config(), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x, state.params)
    params["Dense_0"] = {
        "kernel": params["Dense_0"]["kernel"].at[:, 7].set(-1.0),
        "bias": params["Dense_0"]["bias"].at[7].set(0.01),
    }
    state = state.replace(params=params)
    images = mnist.test_images[:1500]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    _, sown = state.apply_fn(variables, data.normalize(images), train=False, mutable=["intermediates"])  # fmt: skip
    alive = {k: np.asarray(diagnostics.fired(a)) for k, (a,) in sown["intermediates"].items()}
    assert not alive["hidden_0"][7]
    # The same count as from all 1,500 activations at once: no padding, no chunks.
    assert diagnostics.dead_units(state, images) == diagnostics.dead_counts(alive)
    blank = diagnostics.dead_units(state, np.zeros_like(images[:1]))
    assert blank["hidden_0"][0] == blank["hidden_0"][1] - 1  # zero biases: only unit 7 fires
