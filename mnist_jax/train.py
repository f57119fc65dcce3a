"""The training state and the pure step functions every stage shares.

`train_step(state, batch, rng) -> (state, metrics)` is pure and importable; it is not jitted here,
so research code can wrap it (`jax.jit(train_step, donate_argnums=0)`, `jax.vmap`, a scan...).
`train_steps` (K steps in one lax.scan), `train_seeds` (that, vmapped over N seeds) and
`eval_dataset` are the jitted forms the training loop uses, on device-resident data and batch
indices; `train_batch` is one step on given indices. loop.py fetches metrics between calls only.
"""

import functools
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from mnist_jax import data, models, optim


class TrainState(train_state.TrainState):
    """Params, optimizer state and step, plus batch-norm statistics ({} without batch norm) and
    the loss's numbers ({"label_smoothing": ...}): data, like the optimizer's (optim.py)."""

    batch_stats: Any = None
    loss_args: Any = None


@partial(jax.jit, static_argnums=0)
def _init(model, rng, x):
    """model.init as one compiled program (models are hashable, so one per model): a cold start
    compiles it in 0.7x the time of op-by-op init, and a warm one reads one cache entry, not ~100.
    The same variables, bitwise (every stage, checked on this machine)."""
    return model.init(rng, x, train=False)


@functools.lru_cache(maxsize=None)
def _one(model):
    return model


def model_of(config: ml_collections.ConfigDict, conv_grad: str | None = None):
    """The config's model, built for its data and for how it computes (conv_grad: the
    runtime's choice, startup.Runtime; default config.conv_grad, "auto" being XLA's own). Equal
    models are one object, so that their `apply` is one function and a jitted step compiles
    once for runs that differ only in numbers (a bound method compares its object by identity)."""
    s2d = (conv_grad or config.get("conv_grad")) == "space_to_depth"
    return _one(
        models.build(
            **config.model, num_classes=data.spec(config)[1], dtype=config.get("dtype", "float32"), s2d_grad=s2d
        )
    )


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int | None = None, conv_grad: str | None = None
) -> TrainState:
    """Initialise the model and optimizer of `config`. steps_per_epoch sizes the lr schedule."""
    shape, _, num_train = data.spec(config)
    steps_per_epoch = steps_per_epoch or num_train // config.batch_size
    model = model_of(config, conv_grad)
    variables = _init(model, rng, jnp.zeros((1, *shape), jnp.float32))
    loss = config.get("loss") or {}
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=optim.optimizer(config.opt, steps_per_epoch, config.epochs),
        loss_args={"label_smoothing": jnp.float32(loss.get("label_smoothing", 0.0))},
    )


def inference_state(model, variables: dict) -> TrainState:
    """A TrainState around a model's variables (mnist_jax.restore's), for `eval_dataset`."""
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.identity(),
    )


def train_step(
    state: TrainState,
    batch: tuple[jax.Array, jax.Array],
    rng: jax.Array,
    loss_fn=optim.cross_entropy,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on (images float32 [B, H, W, C], labels int [B]).

    Backprop is `jax.value_and_grad` of the loss: loss_fn(logits, labels, **state.loss_args), a
    scalar, or (scalar, {name: extra metric}) logged beside. Dropout draws from fold_in(rng,
    step), so the randomness of a step depends only on the run's key and the step number.
    """
    images, labels = batch
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_of(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )
        out = loss_fn(logits, labels, **(state.loss_args or {}))
        loss, extra = out if isinstance(out, tuple) else (out, {})
        return loss, (logits, updates, extra)

    (loss, (logits, updates, extra)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "learning_rate": optim.learning_rate(state.opt_state),
        **extra,
    }
    return state, metrics


@functools.lru_cache(maxsize=None)
def step_for(loss: str = "cross_entropy"):
    """train_step with the loss named in config.loss.name: one object a name, so that the
    compiled steps, which take it as a static argument, are shared."""
    fn = optim.LOSSES[loss]
    return train_step if fn is optim.cross_entropy else functools.partial(train_step, loss_fn=fn)


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


# The evaluation's metrics, by name: each a function of the test set's logits [n, classes] and
# labels [n], to a scalar or an array (logged as name_0, name_1, ...). loop.train takes more.
EVAL_METRICS = (("loss", optim.cross_entropy), ("accuracy", accuracy))


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
def train_steps(state, images, labels, order, start, rng, steps: int, sharding=None, shift=0, step=train_step):
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
def train_seeds(states, images, labels, orders, start, rngs, steps: int, shift=0, step=train_step):
    """train_steps for N seeds in one vmapped program: states stacked on a leading axis,
    orders [N, S, B], rngs [N] (each seed its own weights, batch order and dropout keys; the
    data are shared). Metrics come back [N, steps].

    On the CPU a seed here is its run alone bit for bit only while no operation crosses the size
    at which XLA:CPU hands it to YNNPACK (4,096 elements, xla/backends/cpu/ynn_support.cc), which
    rounds otherwise: the member axis multiplies every size by N. At batch 128 the softmax's
    reductions ([N, 128, 10]) cross it from N = 4; then seeds differ from their runs alone in the
    last bits, and drift apart later as any float change makes runs do (tests/test_core.py
    bounds it). Computing each member at its own shapes would be exact, but cost 12-18% a step
    here: --seed-mode turn is the exact way."""
    one = lambda s, o, r: _train_rows(s, images, labels, o, start, r, steps, None, shift, step)  # noqa: E731
    return jax.vmap(one)(states, orders, rngs)


# --debug-nans re-runs a step op by op on its inputs when it finds a NaN: nothing donated there.
UNDONATED = {
    fn: jax.jit(fn.__wrapped__, static_argnames=names)
    for fn, names in ((train_steps, ("steps", "sharding", "shift", "step")), (train_seeds, ("steps", "shift", "step")))
}


def _forward(state, images, batch_size: int = 1000, sharding=None):
    """Logits [n, classes] over uint8 images [n, ...] in batches, and the hidden units alive
    (> 0 on some image, not on the zero padding): diagnostics counts the dead ones without a
    pass of its own. With `sharding`, batch_size is rounded up to a multiple of the devices."""
    if sharding is not None:
        batch_size = -(-batch_size // sharding.mesh.size) * sharding.mesh.size
    n = images.shape[0]
    pad = ((0, -n % batch_size),) + ((0, 0),) * (images.ndim - 1)
    batches = data.normalize(jnp.pad(images, pad)).reshape(-1, batch_size, *images.shape[1:])
    logits, per_unit = jax.lax.map(lambda x: _eval_batch(state, _split(x, sharding)), batches)
    alive = {k: v.reshape(-1, v.shape[-1])[:n].any(0) for k, v in per_unit.items()}
    return logits.reshape(-1, logits.shape[-1])[:n], alive


def _eval_dataset(state, images, labels, batch_size: int = 1000, sharding=None, metrics=EVAL_METRICS) -> dict:
    """`metrics` (EVAL_METRICS: loss, accuracy) over uint8 images [n, ...] and their labels, the
    predictions [n], and the hidden units alive, in one call."""
    logits, alive = _forward(state, images, batch_size, sharding)
    scores = {name: fn(logits, labels) for name, fn in metrics}
    return {**scores, "predictions": jnp.argmax(logits, -1), "alive": alive}


eval_dataset = jax.jit(_eval_dataset, static_argnames=("batch_size", "sharding", "metrics"))


@partial(jax.jit, static_argnames=("batch_size", "metrics"))
def eval_seeds(states, images, labels, batch_size: int = 1000, metrics=EVAL_METRICS):
    """eval_dataset of N seeds stacked on a leading axis: each value gains that axis. Member by
    member (lax.map), not vmapped: a vmapped forward pass over shared images rounds its matmuls
    differently (test losses 1e-7 apart), and XLA:CPU's vectorized division too (824 / 1000 gave
    0.82400006 for 0.824); a member's scores are those of its run alone, bitwise, since a sweep
    chooses on them. Evaluation is a small part of an epoch."""
    return jax.lax.map(lambda s: _eval_dataset(s, images, labels, batch_size, None, metrics), states)
