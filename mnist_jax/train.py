"""The training state and the pure step functions every stage shares.

`train_step` is pure and not jitted, for research code to wrap; `train_steps` (K steps in a scan),
`train_seeds` (vmapped over seeds), `train_batch` and `eval_dataset` are the loop's jitted forms."""

from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from mnist_jax import data, models, optim


class TrainState(train_state.TrainState):
    """Params, optimizer state, step, batch-norm statistics ({} without), the loss's numbers (data)
    and, with --opt-ema, the weights' moving average: {"decay", "params", "batch_stats"} (else None)."""

    batch_stats: Any = None
    loss_args: Any = None
    ema: Any = None


@partial(jax.jit, static_argnums=0)
def _init(model, rng, x):
    """model.init compiled, per model: 0.7x op-by-op's cold start, 1 cache entry not ~100; bitwise."""
    return model.init(rng, x, train=False)


_one = lru_cache(maxsize=None)(lambda model: model)  # one object per equal model


def model_of(config: ml_collections.ConfigDict, conv_grad: str | None = None):
    """The config's model for its data and conv_grad (default config.conv_grad); one object per equal model."""
    path = conv_grad or config.get("conv_grad")
    path = "xla" if path in (None, "auto") else path
    dtype = config.get("dtype", "float32")
    return _one(models.build(**config.model, num_classes=data.spec(config)[1], dtype=dtype, conv_grad=path))


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int | None = None, conv_grad: str | None = None
) -> TrainState:
    """Initialise the model and optimizer of `config`. steps_per_epoch sizes the lr schedule."""
    shape, _, num_train = data.spec(config)
    steps_per_epoch = steps_per_epoch or num_train // config.batch_size
    model = model_of(config, conv_grad)
    variables = _init(model, rng, jnp.zeros((1, *shape), jnp.float32))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    decay = config.opt.get("ema", 0.0)  # a number in the state: members may differ in it
    return TrainState.create(
        apply_fn=model.apply,
        **variables,
        tx=optim.optimizer(config.opt, steps_per_epoch, config.epochs),
        loss_args={"label_smoothing": jnp.float32((config.get("loss") or {}).get("label_smoothing", 0.0))},
        ema=dict(decay=jnp.float32(decay), **jax.tree.map(jnp.copy, variables)) if decay else None,
    )


def eval_variables(state: TrainState) -> dict:
    """The variables evaluation uses (a checkpoint's model item): the moving average with --opt-ema."""
    source = state.ema if state.ema is not None else {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": source["params"], "batch_stats": source["batch_stats"]}


def update_ema(old: TrainState, new: TrainState) -> TrainState:
    """`new` with its moving average stepped, at decay min(d, (1 + t) / (10 + t)) for old's step t
    (TF's ExponentialMovingAverage with num_updates): the first steps do not keep the initial weights."""
    if new.ema is None:
        return new
    d = jnp.minimum(new.ema["decay"], (1.0 + old.step) / (10.0 + old.step))
    trained = {"params": new.params, "batch_stats": new.batch_stats}
    average = optax.incremental_update(trained, {k: new.ema[k] for k in trained}, 1.0 - d)
    return new.replace(ema={"decay": new.ema["decay"], **average})


def inference_state(model, variables: dict) -> TrainState:
    """A TrainState around a model's variables (mnist_jax.restore's), for `eval_dataset`."""
    return TrainState.create(apply_fn=model.apply, **variables, tx=optax.identity())


def train_step(
    state: TrainState, batch: tuple[jax.Array, jax.Array], rng: jax.Array, loss_fn=optim.cross_entropy
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on (images float32 [B, H, W, C], labels int [B]): jax.value_and_grad of
    loss_fn(logits, labels, **state.loss_args), a scalar or (scalar, {name: extra metric}) logged
    beside. Dropout draws from fold_in(rng, step): a function of key and step."""
    images, labels = batch
    rngs = {"dropout": jax.random.fold_in(rng, state.step)}

    def loss_of(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(variables, images, train=True, rngs=rngs, mutable=["batch_stats"])
        out = loss_fn(logits, labels, **(state.loss_args or {}))
        loss, extra = out if isinstance(out, tuple) else (out, {})
        return loss, (logits, updates, extra)

    (loss, (logits, updates, extra)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    new = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    state, accuracy = update_ema(state, new), jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {"loss": loss, "accuracy": accuracy, "learning_rate": optim.learning_rate(state.opt_state), **extra}


@lru_cache(maxsize=None)
def step_for(loss: str = "cross_entropy"):
    """train_step with the loss named in config.loss.name: one object a name (a static argument)."""
    fn = optim.LOSSES[loss]
    return train_step if fn is optim.cross_entropy else partial(train_step, loss_fn=fn)


def fired(activations):
    """Per unit (last axis), whether it is > 0 for any image or position: the dead-unit rule."""
    return (activations.reshape(-1, activations.shape[-1]) > 0).any(0)


def _eval_batch(state: TrainState, images: jax.Array) -> tuple[jax.Array, dict]:
    """Logits (batch norm in inference mode) and per example which sown hidden units fired."""
    logits, sown = state.apply_fn(eval_variables(state), images, train=False, mutable=["intermediates"])
    return logits, {k: jax.vmap(fired)(a) for k, (a,) in sown.get("intermediates", {}).items()}  # [B, units]


def eval_step(state: TrainState, batch: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """Per-example loss, correctness and prediction, with batch norm in inference mode."""
    images, labels = batch
    logits, _ = _eval_batch(state, images)  # the units' activity is unused: jit drops it
    prediction = jnp.argmax(logits, -1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"loss": loss, "correct": prediction == labels, "prediction": prediction}


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # The barrier hides the constant n: XLA's "* (1 / n)" made 9,950/10,000 0.99499995.
    n = jax.lax.optimization_barrier(jnp.float32(labels.shape[0]))
    return (jnp.argmax(logits, -1) == labels).sum() / n


# Evaluation metrics by name: (logits [n, classes], labels [n]) -> scalar or array (name_0, ...).
EVAL_METRICS = (("loss", optim.cross_entropy), ("accuracy", accuracy))


def _split(x, sharding):
    """x constrained to `sharding` (parallel.py); None: as it is."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def random_shift(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
    """Translate each image by up to max_shift pixels each way (zero fill): pad, random crop."""
    (n, h, w, c), m = images.shape, max_shift
    padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * m + 1)
    crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def warp(images: jax.Array, angles, scales, shears, fields=None) -> jax.Array:
    """images [n, H, W, C] resampled (bilinear, 0 outside) through each one's affine map about the
    centre: rotation, scale and shear (radians) [n], then its displacement field [n, 2, H, W] or none."""
    n, h, w, c = images.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2

    def one(image, angle, scale, shear, field):  # where each output pixel comes from: the inverse map
        ux, uy = (xs - cx) / scale, (ys - cy) / scale
        rx, ry = jnp.cos(angle) * ux + jnp.sin(angle) * uy, jnp.cos(angle) * uy - jnp.sin(angle) * ux
        x, y = rx - jnp.tan(shear) * ry + cx, ry + cy
        if field is not None:
            y, x = y + field[0], x + field[1]
        sample = lambda channel: jax.scipy.ndimage.map_coordinates(channel, [y, x], order=1, mode="constant")
        return jax.vmap(sample, in_axes=2, out_axes=2)(image)

    return jax.vmap(one)(images, angles, scales, shears, fields)


def smooth_field(rng: jax.Array, n: int, shape: tuple, alpha: float, sigma: float) -> jax.Array:
    """Simard et al.'s elastic distortion: uniform(-1, 1) displacements [n, 2, H, W] smoothed by a Gaussian
    of `sigma` pixels (radius 2 sigma, zero outside), times `alpha`; the blur: banded matmuls (docs/performance.md)."""
    r = max(1, int(2 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    band = lambda m: np.stack([np.pad(k, (i, m))[r : r + m] for i in range(m)])  # [m, m]: row i centred at i
    rows, cols = (jnp.asarray(band(m) / k.sum(), jnp.float32) for m in shape)
    fields = jax.random.uniform(rng, (n, 2, *shape), minval=-1.0, maxval=1.0)
    return alpha * jnp.einsum("ij,abjk,lk->abil", rows, fields, cols)


def random_warp(images: jax.Array, rng: jax.Array, augment: tuple) -> jax.Array:
    """A random affine map (rotation and shear up to augment's degrees, scale within 1 +- its
    fraction) and elastic distortion (alpha, sigma pixels; alpha 0: none) per image, keyed by rng.
    augment: (rotate, scale, shear, elastic alpha, elastic sigma), config.data's (`augmentation`)."""
    rotate, scale, shear, alpha, sigma = augment
    n = images.shape[0]
    ka, ks, kh, ke = jax.random.split(rng, 4)
    uniform = lambda key, bound: jax.random.uniform(key, (n,), minval=-bound, maxval=bound)
    angles, shears = uniform(ka, rotate) * (jnp.pi / 180), uniform(kh, shear) * (jnp.pi / 180)
    fields = smooth_field(ke, n, images.shape[1:3], alpha, sigma) if alpha else None
    return warp(images, angles, 1.0 + uniform(ks, scale), shears, fields)


def augmentation(data_config) -> tuple:
    """random_warp's static argument from config.data: () when off (older configs lack the fields)."""
    names = ("augment_rotate", "augment_scale", "augment_shear", "augment_elastic", "augment_elastic_sigma")
    values = tuple(float(data_config.get(k, 4.0 if k.endswith("sigma") else 0.0)) for k in names)
    return values if any(values[:4]) else ()


def augment_batch(x: jax.Array, rng: jax.Array, step, shift: int = 0, augment: tuple = ()) -> jax.Array:
    """Normalised images as the step at `step` augments them: shifted, then warped, each from a key
    stream of its own, a function of (rng, step) as dropout's (the shift's draws are those of before)."""
    if shift:
        x = random_shift(x, jax.random.fold_in(jax.random.fold_in(rng, 1), step), shift)
    if augment:
        x = random_warp(x, jax.random.fold_in(jax.random.fold_in(rng, 2), step), augment)
    return x


def _train_on(state, images, labels, idx, rng, sharding, shift, step=train_step, augment=()):
    """step on images[idx], labels[idx], normalised (and shifted, warped) on the device."""
    x = augment_batch(data.normalize(images[idx]), rng, state.step, shift, augment)
    return step(state, (_split(x, sharding), _split(labels[idx], sharding)), rng)


@partial(jax.jit, donate_argnums=0, static_argnames=("sharding", "shift"))
def train_batch(state, images, labels, idx, rng, sharding=None, shift=0):
    """train_step on device-resident uint8 images[idx], labels[idx], split by `sharding`, `shift`ed."""
    return _train_on(state, images, labels, idx, rng, sharding, shift)


_STEPS_STATIC = ("steps", "sharding", "shift", "step", "augment", "unroll")
_SEEDS_STATIC = ("steps", "shift", "step", "augment", "unroll")


@partial(jax.jit, donate_argnums=0, static_argnames=_STEPS_STATIC)
def train_steps(
    state, images, labels, order, start, rng, steps: int, sharding=None, shift=0, step=train_step, augment=(),
    unroll=False,
):  # fmt: skip
    """`steps` steps (`step`: train_step's like) in a lax.scan over rows start.. of batch indices `order`
    [S, B], with each one's metrics. unroll: the steps as straight-line code, the CPU's choice: XLA:CPU runs
    a convolution in a loop body ~9x slower (jax-ml/jax#12868), and 8 unrolled conv_bn steps a call were
    faster than one (docs/performance.md)."""
    rows = jax.lax.dynamic_slice_in_dim(order, start, steps)
    one = lambda s, idx: _train_on(s, images, labels, idx, rng, sharding, shift, step, augment)
    if steps == 1:
        state, m = one(state, rows[0])
        return state, jax.tree.map(lambda x: x[None], m)
    return jax.lax.scan(one, state, rows, unroll=unroll)


@partial(jax.jit, donate_argnums=0, static_argnames=_SEEDS_STATIC)
def train_seeds(
    states, images, labels, orders, start, rngs, steps: int, shift=0, step=train_step, augment=(), unroll=False
):  # fmt: skip
    """train_steps vmapped over N seeds (states, orders [N, S, B], rngs [N]). On the CPU not bitwise a seed
    alone from N = 4 at batch 128 (YNNPACK, docs/performance.md): --seed-mode turn is exact."""
    one = lambda s, o, r: train_steps.__wrapped__(
        s, images, labels, o, start, r, steps, None, shift, step, augment, unroll
    )
    return jax.vmap(one)(states, orders, rngs)


# --debug-nans re-runs a step op by op on its inputs when it finds a NaN: nothing donated there.
UNDONATED = {
    train_steps: jax.jit(train_steps.__wrapped__, static_argnames=_STEPS_STATIC),
    train_seeds: jax.jit(train_seeds.__wrapped__, static_argnames=_SEEDS_STATIC),
}


@partial(jax.jit, static_argnames=("batch_size", "sharding", "metrics"))
def eval_dataset(state, images, labels, batch_size: int = 1000, sharding=None, metrics=EVAL_METRICS) -> dict:
    """`metrics` over uint8 images [n, ...] and labels, in batches (of a multiple of the devices); the
    predictions, and the hidden units alive on some image (for diagnostics)."""
    if sharding is not None:
        batch_size = -(-batch_size // sharding.mesh.size) * sharding.mesh.size
    n = images.shape[0]
    pad = ((0, -n % batch_size),) + ((0, 0),) * (images.ndim - 1)
    batches = data.normalize(jnp.pad(images, pad)).reshape(-1, batch_size, *images.shape[1:])
    logits, per_unit = jax.lax.map(lambda x: _eval_batch(state, _split(x, sharding)), batches)
    alive = {k: v.reshape(-1, v.shape[-1])[:n].any(0) for k, v in per_unit.items()}
    logits = logits.reshape(-1, logits.shape[-1])[:n]
    scores = {name: fn(logits, labels) for name, fn in metrics}
    return {**scores, "predictions": jnp.argmax(logits, -1), "alive": alive}


@partial(jax.jit, static_argnames=("batch_size", "metrics"))
def eval_seeds(states, images, labels, batch_size: int = 1000, metrics=EVAL_METRICS):
    """eval_dataset of N stacked seeds by lax.map, bitwise each run's (vmapped: 824/1000 gave 0.82400006)."""
    return jax.lax.map(lambda s: eval_dataset.__wrapped__(s, images, labels, batch_size, None, metrics), states)
