"""Diagnostics of a run that does not learn: a collapse to one class, dead units."""

from types import SimpleNamespace

import jax
import numpy as np

from experiments import conv, dense_relu, dense_sigmoid, linear
from mnist_jax import cli, data, diagnostics, evaluate, hooks, train


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


def _collapse_warning(get_config, alive, capsys) -> str:
    """What hooks.CollapseWarning prints for one member that predicts class 3 everywhere."""
    run = SimpleNamespace(index=0, config=get_config(), primary=True, group=SimpleNamespace(label=lambda i: ""))
    evaluation = {"test": {"predictions": np.full(10, 3), "alive": {k: v[0] for k, v in alive.items()}}}
    hooks.CollapseWarning().on_epoch_end(run, {"epoch": 1, "test_accuracy": 0.1}, evaluation)
    return capsys.readouterr().err


def test_collapse_warning_names_the_units_the_activation_has(capsys):
    # dense_sigmoid collapses to one class early in some seeds (tests/test_stages.py). Its units
    # are sigmoids, which no ReLU rule describes: 0 on every image means saturated at 0.
    alive = {"hidden_0": np.ones((1, 200), bool), "hidden_1": np.ones((1, 60), bool)}
    alive["hidden_1"][0, :5] = False
    sigmoid = _collapse_warning(dense_sigmoid.get_config, alive, capsys)
    assert "predicts class 3" in sigmoid and "hidden_0 0/200, hidden_1 5/60" in sigmoid
    assert "relu" not in sigmoid.lower() and "sigmoid units saturated at 0" in sigmoid
    relu = _collapse_warning(dense_relu.get_config, alive, capsys)  # the same counts
    assert "dead ReLU units (0 on every test image): hidden_0 0/200, hidden_1 5/60" in relu
    # No hidden layer, no units to speak of.
    softmax = _collapse_warning(linear.get_config, {}, capsys)
    assert "predicts class 3" in softmax and "units" not in softmax


def test_a_sigmoid_unit_counts_dead_only_saturated_at_exactly_0(mnist):
    # What the warning says of a sigmoid network: a unit far below 0 on every image (-100:
    # sigmoid 0 in float32) counts; one merely near 0 (-10: sigmoid 4.5e-5) does not.
    state = train.create_train_state(dense_sigmoid.get_config(), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x, state.params)
    kernel, bias = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    params["Dense_0"] = {
        "kernel": kernel.at[:, 3].set(0.0).at[:, 4].set(0.0),
        "bias": bias.at[3].set(-100.0).at[4].set(-10.0),
    }
    dead = diagnostics.dead_units(state.replace(params=params), mnist.test_images[:500])
    assert dead == {"hidden_0": (1, 200), "hidden_1": (0, 60)}


def test_evaluate_names_the_units_of_the_runs_activation(mnist_dir, tmp_path, capsys):
    """`mnist_jax.evaluate` on a sigmoid network speaks of saturated units, not dead ReLUs."""
    argv = ["--epochs", "1", "--data-train-limit", "1024", "--plots", "false"]
    cli.run(dense_sigmoid.get_config, [*argv, "--data-dir", str(mnist_dir), "--workdir", str(tmp_path)])  # fmt: skip
    capsys.readouterr()
    evaluate.main(["--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "sigmoid units saturated at 0 (exactly 0 on every test image): hidden_0 " in printed
    assert "ReLU" not in printed
