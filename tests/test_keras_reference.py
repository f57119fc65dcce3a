"""The port against the codelab's own framework: from the same initial weights and batches, our
training steps and Keras 3's `fit` (keras_model, keras_train in experiments.references) agree."""

import jax
import numpy as np
import pytest

from experiments import conv, conv_bn, references
from mnist_jax import data, diagnostics, train

N, STEPS_PER_EPOCH = 384, 3  # 2 epochs of 3 steps of 128: the learning rate decays once


def conv_bn_without_dropout():
    config = conv_bn.get_config()
    config.model.dropout = 0.0  # dropout masks cannot match between frameworks; all else can
    return config


# Training at lr 0.01 amplifies rounding: perturbing our own initial weights by 1e-6 moved
# conv's loss 0.5% within 5 steps. So the tolerances are per model, from measured gaps. Same
# weights and batches, 6 steps, loss gap from Keras's: conv 1.4e-5 (optax.adam: 6.9e-2, from
# its epsilon); conv_bn 1e-4 by step 3 and 4e-3 by step 6, its batch norm is the more chaotic.
@pytest.mark.parametrize(
    "get_config, loss_rtol, weight_rtol",
    [(conv.get_config, 1e-3, 5e-3), (conv_bn_without_dropout, 2e-2, 5e-2)],
)
def test_same_steps_as_keras_fit(get_config, loss_rtol, weight_rtol, mnist):
    # Both sides' products in float32 (a GPU would use TF32, 1e-3 relative: over the first bar).
    with jax.default_matmul_precision("highest"):
        same_steps_as_keras_fit(get_config, loss_rtol, weight_rtol, mnist)


def same_steps_as_keras_fit(get_config, loss_rtol, weight_rtol, mnist):
    config = get_config()
    config.epochs, config.data.train_limit = 2, N
    config.batch_size = N // STEPS_PER_EPOCH
    keras, model = references._keras_compiled(config)
    variables = jax.tree.map(jax.numpy.asarray, references.keras_variables(model))
    state = train.create_train_state(config, jax.random.PRNGKey(0), STEPS_PER_EPOCH)
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(state.params)
    state = state.replace(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=state.tx.init(variables["params"]),
    )
    x, y = mnist.train_images[:N], mnist.train_labels[:N]
    ours = []
    for epoch in range(config.epochs):  # the same batches, in order, on both sides
        for i in range(STEPS_PER_EPOCH):
            idx = np.arange(i * config.batch_size, (i + 1) * config.batch_size, dtype=np.int32)
            state, m = train.train_batch(state, x, y, idx, jax.random.PRNGKey(1))
            ours.append(float(m["loss"]))

    running = []  # Keras logs the epoch's running mean of the loss after each batch

    class Losses(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            running.append(logs["loss"])

    lr, decay = config.opt.lr, config.opt.decay
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: lr * decay**epoch)
    model.fit(
        np.asarray(data.normalize(x)), y.astype(np.int32), batch_size=config.batch_size,
        epochs=config.epochs, shuffle=False, verbose=0, callbacks=[schedule, Losses()],
    )  # fmt: skip
    running = np.reshape(running, (config.epochs, STEPS_PER_EPOCH))
    k = np.arange(1, STEPS_PER_EPOCH + 1)
    theirs = np.concatenate([r * k - np.concatenate([[0], r[:-1] * k[:-1]]) for r in running])
    np.testing.assert_allclose(ours[:3], theirs[:3], rtol=1e-3)  # before chaos sets in
    np.testing.assert_allclose(ours, theirs, rtol=loss_rtol)  # through the lr decay
    keras_after = references.keras_variables(model)
    for path, a in jax.tree_util.tree_leaves_with_path(state.params):
        b = keras_after["params"]
        for key in path:
            b = b[key.key]
        rel = np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)
        assert rel < weight_rtol, (jax.tree_util.keystr(path), rel)
    for name, s in state.batch_stats.items():
        for k in ("mean", "var"):  # momentum 0.99 and the variance's formula
            np.testing.assert_allclose(s[k], keras_after["batch_stats"][name][k], rtol=5e-2, atol=1e-3)  # fmt: skip


@pytest.mark.parametrize("get_config", [conv.get_config, conv_bn_without_dropout])
def test_keras_dead_units_match_ours_on_the_same_weights(get_config, mnist):
    # 10 Keras steps at lr 0.01 kill some ReLUs (conv) or none (batch norm); both counters must
    # see the same units, layer by layer, on the same images.
    config = get_config()
    keras, model = references._keras_compiled(config)
    x, y = mnist.train_images[:1280], mnist.train_labels[:1280]
    model.fit(np.asarray(data.normalize(x)), y.astype(np.int32), batch_size=128, epochs=1,
              shuffle=False, verbose=0)  # fmt: skip
    state = train.create_train_state(config, jax.random.PRNGKey(0), 10)
    variables = jax.tree.map(jax.numpy.asarray, references.keras_variables(model))
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    images = mnist.test_images[:2000]
    theirs = references.keras_dead_units(model, images)
    assert theirs == diagnostics.dead_units(state, images)
    assert [n for _, n in theirs.values()] == [12, 24, 32, 200]
    if not config.model.batch_norm:
        assert sum(d for d, _ in theirs.values()) > 0  # some died: the comparison is not 0 == 0
