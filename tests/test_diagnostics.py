"""Diagnostics of a run that does not learn: a collapse to one class, dead ReLU units."""

import jax
import numpy as np

from experiments import conv
from mnist_jax import diagnostics, train


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
