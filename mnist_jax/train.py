"""The training state and the pure step functions every stage shares.

`train_step(state, batch, rng) -> (state, metrics)` is pure and importable; it is not jitted here,
so research code can wrap it (`jax.jit(train_step, donate_argnums=0)`, `jax.vmap`, a scan...).
`train_steps` (K steps in one lax.scan), `train_seeds` (that, vmapped over N seeds) and
`eval_dataset` are the jitted forms the training loop uses, on device-resident data and batch
indices; `train_batch` is one step on given indices. loop.py fetches metrics between calls only.
"""

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from mnist_jax import checkpoint, data, models

ADAM_EPS = 1e-7  # Keras's default; optax's is 1e-8


class TrainState(train_state.TrainState):
    """Params, optimizer state and step, plus batch-norm statistics ({} without batch norm)."""

    batch_stats: Any = None


def scale_by_keras_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = ADAM_EPS
) -> optax.GradientTransformation:
    """Adam's update as Keras (and TensorFlow, which the codelab ran) computes it.

    update = m * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps): eps is added to sqrt(v) before
    the bias correction. optax.scale_by_adam adds it after (to sqrt(v_hat)), an eps 1/sqrt(1-b2^t)
    times smaller: 32x at step 1, 10x at step 10. At lr 0.01 that matters: weights whose
    gradients are tiny take full lr-sized first steps under optax's form and damped ones under
    Keras's. From the same weights and batches, 20 conv steps ended 6-36% apart in weights from
    Keras's with optax.adam, and under 1% apart with this (tests/test_keras_reference.py).
    """

    def init(params):
        zeros = optax.tree.zeros_like
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(params), zeros(params))

    def update(updates, state, params=None):
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        alpha = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda m, v: alpha * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def keras_adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = ADAM_EPS):
    """keras.optimizers.Adam: scale_by_keras_adam, then the learning rate (a schedule allowed)."""
    return optax.chain(
        scale_by_keras_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate)
    )


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, epochs: int = 1):
    """SGD or Keras's Adam, with lr = opt.lr * opt.decay ** epoch as Keras's LearningRateScheduler.

    opt.schedule "onecycle" instead warms up to opt.lr for the first 20% of the run, then anneals
    (cosine) to opt.lr / 1000 at its end (optax.cosine_onecycle_schedule): the speedrun's.
    `inject_hyperparams` keeps the learning rate actually used in the optimizer state, for logging.
    """
    # .get: config.json of runs from before these fields (experiments/report.py reads them)
    if opt.get("schedule", "exponential") == "onecycle":
        schedule = optax.cosine_onecycle_schedule(
            transition_steps=epochs * steps_per_epoch,
            peak_value=opt.lr,
            pct_start=0.2,
            div_factor=25,
            final_div_factor=40,
        )
    else:
        schedule = optax.exponential_decay(
            init_value=opt.lr,
            transition_steps=steps_per_epoch,
            decay_rate=opt.decay,
            staircase=True,
        )
    if opt.name == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    return optax.inject_hyperparams(keras_adam)(learning_rate=schedule)


@partial(jax.jit, static_argnums=0)
def _init(model, rng, x):
    """model.init as one compiled program (models are hashable, so one per model): a cold start
    compiles it in 0.7x the time of op-by-op init, and a warm one reads one cache entry, not ~100.
    The same variables, bitwise (every stage, checked on this machine)."""
    return model.init(rng, x, train=False)


def model_of(config: ml_collections.ConfigDict):
    """The config's model, built for its data and for how it computes (startup.resolve decides
    conv_grad "auto"; unresolved, XLA's own gradient)."""
    s2d = config.get("conv_grad") == "space_to_depth"
    return models.build(**config.model, num_classes=data.spec(config)[1],
                        dtype=config.get("dtype", "float32"), s2d_grad=s2d)  # fmt: skip


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int | None = None
) -> TrainState:
    """Initialise the model and optimizer of `config`. steps_per_epoch sizes the lr schedule."""
    shape, _, num_train = data.spec(config)
    steps_per_epoch = steps_per_epoch or num_train // config.batch_size
    model = model_of(config)
    variables = _init(model, rng, jnp.zeros((1, *shape), jnp.float32))
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=make_optimizer(config.opt, steps_per_epoch, config.epochs),
    )


def inference_state(restored: checkpoint.Restored) -> TrainState:
    """A TrainState around restored variables, for `eval_dataset` (no optimizer state)."""
    return TrainState.create(
        apply_fn=restored.model.apply,
        params=restored.variables["params"],
        batch_stats=restored.variables["batch_stats"],
        tx=optax.identity(),
    )


def learning_rate(state: TrainState) -> jax.Array:
    """The learning rate of the last update, or NaN if the optimizer does not expose it."""
    hyper = getattr(state.opt_state, "hyperparams", {})
    return jnp.asarray(hyper.get("learning_rate", jnp.nan), jnp.float32)


def train_step(
    state: TrainState, batch: tuple[jax.Array, jax.Array], rng: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on (images float32 [B,28,28,1], labels int [B]).

    Backprop is `jax.value_and_grad` of the loss. Dropout draws from fold_in(rng, step), so the
    randomness of a step depends only on the run's key and the step number.
    """
    images, labels = batch
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(
        grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "learning_rate": learning_rate(state),
    }
    return state, metrics


def fired(activations):
    """Per unit (last axis), whether it is > 0 for any image or position: numpy or jax arrays.

    The dead-unit rule (diagnostics.py; Keras's units too), here so that evaluation applies it
    in its own forward pass."""
    return (activations.reshape(-1, activations.shape[-1]) > 0).any(0)


def _eval_batch(state: TrainState, images: jax.Array) -> tuple[jax.Array, dict]:
    """Logits, with batch norm in inference mode, and per example which units of each hidden
    layer fired."""
    logits, sown = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        images,
        train=False,
        mutable=["intermediates"],  # the hidden activations models.py sows; none in `linear`
    )
    hidden = sown.get("intermediates", {})
    return logits, {k: jax.vmap(fired)(a) for k, (a,) in hidden.items()}  # [B, units]


def eval_step(state: TrainState, batch: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """Per-example loss, correctness and prediction, with batch norm in inference mode."""
    images, labels = batch
    logits, _ = _eval_batch(state, images)  # the units' activity is unused: jit drops it
    prediction = jnp.argmax(logits, -1)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        "correct": prediction == labels,
        "prediction": prediction,
    }


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # A count over n, correctly rounded: XLA turns "/ constant" into "* (1 / constant)", which
    # makes 9,950/10,000 0.99499995 (under 99.5%); the barrier hides the constant.
    n = jax.lax.optimization_barrier(jnp.float32(labels.shape[0]))
    return (jnp.argmax(logits, -1) == labels).sum() / n


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# The evaluation's metrics, by name: each a function of the test set's logits [n, classes] and
# labels [n], to a scalar or an array (logged as name_0, name_1, ...). loop.train takes more.
EVAL_METRICS = (("loss", cross_entropy), ("accuracy", accuracy))


def _split(x, sharding):
    """Constrain x's leading (batch) dimension to `sharding` (parallel.py); None: leave it."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def random_shift(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
    """Translate each image by up to max_shift pixels each way (zero fill): pad, random crop."""
    n, h, w, c = images.shape
    m = max_shift
    padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * m + 1)
    crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def _train_on(state, images, labels, idx, rng, sharding, shift, step=train_step):
    """step (train_step) on images[idx], labels[idx], normalised (and shifted) on the device."""
    x = data.normalize(images[idx])
    if shift:  # augmentation: its own key stream, a function of (rng, step) as dropout's
        x = random_shift(x, jax.random.fold_in(jax.random.fold_in(rng, 1), state.step), shift)
    batch = (_split(x, sharding), _split(labels[idx], sharding))
    return step(state, batch, rng)


@partial(jax.jit, donate_argnums=0, static_argnames=("sharding", "shift"))
def train_batch(state, images, labels, idx, rng, sharding=None, shift=0):
    """train_step on images[idx], labels[idx]: device-resident uint8 data, sliced on the device.

    With `sharding` (a NamedSharding splitting the batch over a mesh), each device computes its
    part of the batch; gradients and batch-norm statistics are those of the whole batch.
    `shift` > 0 translates each image randomly by up to that many pixels (augmentation).
    """
    return _train_on(state, images, labels, idx, rng, sharding, shift)


def _train_rows(state, images, labels, order, start, rng, steps, sharding, shift, step):
    """`steps` steps on the batches order[start : start + steps]: (state, metrics [steps])."""
    rows = jax.lax.dynamic_slice_in_dim(order, start, steps)
    one = lambda s, idx: _train_on(s, images, labels, idx, rng, sharding, shift, step)  # noqa: E731
    if steps == 1:  # no loop: XLA:CPU compiles a convolution in a loop body slower
        state, m = one(state, rows[0])
        return state, jax.tree.map(lambda x: x[None], m)
    return jax.lax.scan(one, state, rows)


@partial(jax.jit, donate_argnums=0, static_argnames=("steps", "sharding", "shift", "step"))
def train_steps(state, images, labels, order, start, rng, steps: int, sharding=None, shift=0,
                step=train_step):  # fmt: skip
    """`steps` training steps in one call: a lax.scan over the rows start..start+steps-1 of the
    device-resident batch indices `order` [S, B]; returns the state and each step's metrics.
    `step` is the step function (train_step, or a researcher's with the same signature).

    No host round trip inside, so on a GPU or TPU the whole epoch can be one call. XLA:CPU runs
    convolutions inside a loop body several times slower (jax-ml/jax#12868: 270-460 ms a conv_bn
    step in a scan against 22-51 ms called one by one), so on the CPU the loop calls it with
    steps=1, which has no loop at all.
    """
    return _train_rows(state, images, labels, order, start, rng, steps, sharding, shift, step)


@partial(jax.jit, donate_argnums=0, static_argnames=("steps", "shift", "step"))
def train_seeds(states, images, labels, orders, start, rngs, steps: int, shift=0,
                step=train_step):  # fmt: skip
    """train_steps for N seeds in one vmapped program: states stacked on a leading axis,
    orders [N, S, B], rngs [N] (each seed its own weights, batch order and dropout keys; the
    data are shared). Metrics come back [N, steps]."""
    one = lambda s, o, r: _train_rows(s, images, labels, o, start, r, steps, None, shift, step)  # noqa: E731
    return jax.vmap(one)(states, orders, rngs)


def _eval_dataset(state, images, labels, batch_size: int = 1000, sharding=None,
                  metrics=EVAL_METRICS) -> dict:  # fmt: skip
    """`metrics` (EVAL_METRICS: loss, accuracy) over uint8 images [n, ...] and their labels, the
    predictions [n], and the hidden units alive (> 0 on some image), in one call.

    With `sharding`, batch_size is rounded up to a multiple of the device count.
    """
    if sharding is not None:
        batch_size = -(-batch_size // sharding.mesh.size) * sharding.mesh.size
    n = images.shape[0]
    pad = ((0, -n % batch_size),) + ((0, 0),) * (images.ndim - 1)
    batches = data.normalize(jnp.pad(images, pad)).reshape(-1, batch_size, *images.shape[1:])
    logits, per_unit = jax.lax.map(lambda x: _eval_batch(state, _split(x, sharding)), batches)
    logits = logits.reshape(-1, logits.shape[-1])[:n]
    return {
        **{name: fn(logits, labels) for name, fn in metrics},
        "predictions": jnp.argmax(logits, -1),
        # Units that fired on some test image (not on the zero padding): diagnostics counts
        # the dead ones without a pass of its own.
        "alive": {k: v.reshape(-1, v.shape[-1])[:n].any(0) for k, v in per_unit.items()},
    }


eval_dataset = jax.jit(_eval_dataset, static_argnames=("batch_size", "sharding", "metrics"))


@partial(jax.jit, static_argnames=("batch_size", "metrics"))
def eval_seeds(states, images, labels, batch_size: int = 1000, metrics=EVAL_METRICS):
    """eval_dataset of N seeds stacked on a leading axis, vmapped: each value gains that axis."""
    return jax.vmap(lambda s: _eval_dataset(s, images, labels, batch_size, None, metrics))(states)
