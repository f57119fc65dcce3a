"""The codelab's recipes in Keras 3 (JAX backend) and conv_bn in PyTorch: our references.

Keras is the codelab's own framework: `keras_model` builds a stage's model layer for layer,
`keras_train` trains a stage the codelab's way with `model.fit` (experiments.seeds
--framework keras), and tests/test_keras_reference.py checks our steps against its steps from
the same weights. `measure_keras` and `measure_torch` time the same conv_bn training as
experiments.timing.measure_ours, in the same dict (experiments/benchmark.py). Both come from the
`bench` extra (`pip install -e '.[bench]'`); nothing in mnist_jax imports this module.
"""

import time

import jax
import numpy as np

from experiments.timing import _indices, _summary, _train_arrays, window_steps_for
from mnist_jax import data, diagnostics, loop, optim


def _keras():
    """Keras 3 on its JAX backend. Keras fixes its backend when first imported (TensorFlow, when
    installed, is the default), so a process that imported it earlier must set KERAS_BACKEND=jax."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"keras was imported with its {keras.backend.backend()!r} backend before "
            "experiments.references could choose JAX; set KERAS_BACKEND=jax"
        )
    return keras


def keras_model(model: dict):
    """A stage's model (its config.model) in Keras 3, layer for layer as the codelab builds it."""
    keras = _keras()
    from keras import layers as l

    def bn():
        return l.BatchNormalization(center=True, scale=False, momentum=0.99, epsilon=1e-3)

    layers = [keras.Input((28, 28, 1))]
    if model["name"] == "conv":
        norm = model["batch_norm"]
        act = "linear" if norm else "relu"
        for c, k, s in zip(model["channels"], model["kernels"], model["strides"], strict=True):
            layers.append(l.Conv2D(c, k, strides=s, padding="same", use_bias=not norm, activation=act))  # fmt: skip
            layers += [bn(), l.Activation("relu")] if norm else []
        layers += [l.Flatten(), l.Dense(model["dense"], use_bias=not norm, activation=act)]
        layers += [bn(), l.Activation("relu")] if norm else []
        layers += [l.Dropout(model["dropout"])] if model["dropout"] else []
    else:
        layers.append(l.Flatten())
        for n in model.get("features", ()):
            layers.append(l.Dense(n, activation=model["activation"]))
            layers += [l.Dropout(model["dropout"])] if model["dropout"] else []
    layers.append(l.Dense(10))  # logits: the loss applies the softmax (see _keras_compiled)
    return keras.Sequential(layers)


def keras_variables(model) -> dict:
    """A keras_model's weights as our model's variables ({"params", "batch_stats"}), by layer order."""
    params, stats, seen = {}, {}, {}
    flax_name = {"Conv2D": "Conv", "Dense": "Dense", "BatchNormalization": "BatchNorm"}
    for layer in model.layers:
        kind = flax_name.get(type(layer).__name__)
        if kind is None:
            continue
        name = f"{kind}_{seen.setdefault(kind, 0)}"
        seen[kind] += 1
        w = {v.path.rsplit("/", 1)[-1]: np.asarray(v.value) for v in layer.weights}
        if kind == "BatchNorm":
            params[name] = {"bias": w["beta"]}
            stats[name] = {"mean": w["moving_mean"], "var": w["moving_variance"]}
        else:
            params[name] = {k: w[k] for k in ("kernel", "bias") if k in w}
    return {"params": params, "batch_stats": stats}


def _keras_compiled(config):
    keras = _keras()
    keras.utils.set_random_seed(config.seed)
    model = keras_model(config.model.to_dict())
    opt = (
        keras.optimizers.Adam(config.opt.lr, epsilon=optim.ADAM_EPS)
        if config.opt.name == "adam"
        else keras.optimizers.SGD(config.opt.lr)
    )
    # The codelab's softmax layer + categorical_crossentropy: TF-Keras 2, which it ran, computed
    # that loss from the logits under the softmax. Keras 3 on JAX would clip probabilities to
    # [1e-7, 1 - 1e-7] instead, and confident examples would stop giving gradients.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(opt, loss=loss, metrics=["accuracy"])
    return keras, model


def keras_dead_units(model, images, batch_size: int = 1000) -> dict[str, tuple[int, int]]:
    """diagnostics.dead_units for a keras_model: per hidden activation, units 0 on every image.

    Hidden activations are the outputs of the layers with a nonlinearity (a Conv2D or Dense with
    activation="relu", or an Activation after batch norm), named hidden_0, hidden_1, ... in order,
    as our models sow them.
    """
    keras = _keras()
    linear = keras.activations.get("linear")
    hidden = [layer.output for layer in model.layers if getattr(layer, "activation", linear) is not linear]  # fmt: skip
    if not hidden:
        return {}
    acts = keras.Model(model.inputs, hidden).predict(
        np.asarray(data.normalize(images)), batch_size=batch_size, verbose=0
    )
    acts = acts if isinstance(acts, list) else [acts]
    return diagnostics.dead_counts({f"hidden_{i}": diagnostics.fired(a) for i, a in enumerate(acts)})


def keras_train(config, data_dir=None) -> dict:
    """Train `config`'s stage with Keras 3 (JAX backend) the codelab's way; the reference.

    `model.fit` on the same /256 pixels, batch size, epochs, optimizer and per-epoch
    `LearningRateScheduler` (lr * decay^epoch), with Keras's own initialisers and shuffling, and
    its seed from config.seed. One difference from the notebooks: they batch a tf.data pipeline
    with drop_remainder (468 steps of 128); `fit` on arrays also trains the last 96 images.
    Returns the test accuracy after each epoch, in timing.time_to_accuracy's format.
    """
    keras, model = _keras_compiled(config)
    arrays = loop.split_data(data.from_config(config.data), config)
    (x, y), (tx, ty) = arrays["train"], arrays["test"]
    lr, decay = config.opt.lr, config.opt.decay
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: lr * decay**epoch)
    start = time.perf_counter()
    fit = model.fit(
        np.asarray(data.normalize(x)), y.astype(np.int32), batch_size=config.batch_size,
        epochs=config.epochs, shuffle=True, verbose=0, callbacks=[schedule],
        validation_data=(np.asarray(data.normalize(tx)), ty.astype(np.int32)),
        validation_batch_size=1000,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    accs = [float(a) for a in fit.history["val_accuracy"]]
    predictions = model.predict(np.asarray(data.normalize(tx)), batch_size=1000, verbose=0)
    return {
        "stage": config.name,
        "framework": f"keras {keras.__version__} ({keras.backend.backend()})",
        "seed": config.seed,
        "epochs": len(accs),
        "seconds": round(seconds, 2),  # compilation included: fit compiles on its first step
        "test_accuracy": accs[-1],  # Keras calls it val_accuracy: it is our test set's
        "history": [{"epoch": i + 1, "test_accuracy": a} for i, a in enumerate(accs)],
        "best_epoch": None,  # no validation split here: nothing chosen
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "collapsed_to": diagnostics.collapsed_to(np.argmax(predictions, -1)),
        "dead_units": keras_dead_units(model, tx),  # as time_to_accuracy's, on the test images
    }


def measure_keras(config, data_dir, windows: int, window_images: int) -> dict:
    """The same model (keras_model), trained by Keras 3's `fit` on the JAX backend."""
    keras, model = _keras_compiled(config)
    batch = config.batch_size
    images, labels = _train_arrays(data_dir)
    x = data.normalize(images)
    steps = window_steps_for(batch, window_images)
    total = 4 + windows * steps
    stamps = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    model.fit(
        np.asarray(x), labels.astype(np.int32), batch_size=batch, epochs=-(-total * batch // len(x)),
        steps_per_epoch=min(total, len(x) // batch), verbose=0, callbacks=[Clock()],
    )  # fmt: skip
    first = stamps[0] - t0
    seconds = [stamps[3 + (w + 1) * steps] - stamps[3 + w * steps] for w in range(windows)]
    summary = _summary("keras", f"keras {keras.__version__} (jax)", batch, first, seconds, steps)
    summary["trainable_params"] = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    summary["device"] = jax.default_backend()
    return summary


def torch_model():
    """conv_bn in PyTorch: explicit padding for SAME strided convs; BN scale fixed at 1."""
    import torch
    from torch import nn

    def bn(n, cls=nn.BatchNorm2d):  # Keras momentum 0.99 is PyTorch's 0.01
        norm = cls(n, eps=1e-3, momentum=0.01)
        norm.weight.requires_grad_(False)  # center, no scale
        return norm

    def conv(cin, cout, k, stride):
        lo, hi = (k - stride) // 2, (k - stride + 1) // 2  # SAME, as TF pads: extra on the right
        return [nn.ZeroPad2d((lo, hi, lo, hi)), nn.Conv2d(cin, cout, k, stride, bias=False)]

    model = nn.Sequential(
        *conv(1, 12, 3, 1), bn(12), nn.ReLU(),
        *conv(12, 24, 6, 2), bn(24), nn.ReLU(),
        *conv(24, 32, 6, 2), bn(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(7 * 7 * 32, 200, bias=False), bn(200, nn.BatchNorm1d), nn.ReLU(),
        nn.Dropout(0.3), nn.Linear(200, 10),
    )  # fmt: skip
    for m in model.modules():  # Keras's initialisation
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model, torch


def measure_torch(batch: int, data_dir, windows: int, window_images: int) -> dict:
    """The same model in PyTorch, a plain eager loop over tensors on its device (GPU if any)."""
    model, torch = torch_model()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 0.01, eps=1e-7)
    images, labels = _train_arrays(data_dir)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 NCHW
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    steps = window_steps_for(batch, window_images)
    idx = torch.from_numpy(_indices(len(images), batch, 4 + windows * steps)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step(i):
        xb = x[idx[i]].float() / 256
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), y[idx[i]])
        loss.backward()
        opt.step()
        return loss

    t = time.perf_counter()
    step(0).item()  # .item() waits for the device
    first = time.perf_counter() - t
    for i in range(1, 4):
        loss = step(i)
    loss.item()
    seconds = []
    for w in range(windows):
        t = time.perf_counter()
        for i in range(4 + w * steps, 4 + (w + 1) * steps):
            loss = step(i)
        loss.item()
        seconds.append(time.perf_counter() - t)
    summary = _summary("pytorch", f"torch {torch.__version__}", batch, first, seconds, steps)
    summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["threads"] = torch.get_num_threads()
    summary["device"] = device
    return summary
