"""Optimizers, learning-rate schedules and losses by name, built from optax; their numbers as data.

The numbers (peak lr, weight decay; label smoothing, TrainState.loss_args) live in the state, not
the program: optimizers differing only in them share one compiled step and can be vmapped."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

ADAM_EPS = 1e-7  # Keras's default; optax's is 1e-8


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999, eps: float = ADAM_EPS) -> optax.GradientTransformation:
    """Keras's Adam: eps added to sqrt(v) before the bias correction (optax's: after), docs/results.md."""

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


def shape(schedule: str, decay: float, warmup: float, steps_per_epoch: int, epochs: int):
    """The schedule with peak 1 (rate opt.lr * shape(t)): exponential (decay ** epoch, Keras's), onecycle
    (up over 20%, cosine down to 1/1000), cosine (linear warm-up over `warmup`, down to 0), constant."""
    total = epochs * steps_per_epoch
    if schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total, 1.0, pct_start=0.2, div_factor=25, final_div_factor=40)
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, round(warmup * total), total)
    if schedule == "constant":
        return optax.constant_schedule(1.0)
    return optax.exponential_decay(1.0, steps_per_epoch, decay, staircase=True)


def _chain(lr, weight_decay, *, name, momentum, nesterov, clip_norm, schedule):
    """The transformation for injected numbers lr (the peak) and weight_decay."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    if name == "sgd" and momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    elif name == "adam":
        parts.append(scale_by_keras_adam())
    elif name in ("optax_adam", "adamw"):
        parts.append(optax.scale_by_adam())
    if name == "adamw":  # decoupled: added to the update, then scaled by the rate
        parts.append(optax.add_decayed_weights(weight_decay))
    # The rate used, lr * schedule(t), evaluated and kept in this state at each step.
    rate = optax.inject_hyperparams(optax.scale_by_learning_rate)
    return optax.chain(*parts, rate(learning_rate=lambda count: lr * schedule(count)))


@functools.lru_cache(maxsize=None)
def _transform(name, momentum, nesterov, clip_norm, schedule, decay, warmup, spe, epochs):
    kw = dict(name=name, momentum=momentum, nesterov=nesterov, clip_norm=clip_norm)
    factory = functools.partial(_chain, **kw, schedule=shape(schedule, decay, warmup, spe, epochs))
    static = ("name", "momentum", "nesterov", "clip_norm", "schedule")  # a callable would be a schedule
    return optax.inject_hyperparams(factory, static_args=static)(lr=0.0, weight_decay=0.0)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation of a config's `opt`; equal whatever its numbers (TrainState.tx is static)."""

    key: tuple  # the names and shapes: what the program is
    numbers: dict = dataclasses.field(compare=False)  # what init puts in the state

    def init(self, params):  # the numbers as data in the state, not constants of the program
        state = _transform(*self.key).init(params)
        return optax.tree.set(state, **{k: jnp.float32(v) for k, v in self.numbers.items()})

    def update(self, updates, state, params=None, **extra_args):
        return _transform(*self.key).update(updates, state, params, **extra_args)


def optimizer(opt, steps_per_epoch: int, epochs: int = 1) -> Optimizer:
    """The transformation of config `opt` (see the module's doc)."""
    get = opt.get  # .get: config.json of runs from before these fields
    static = (opt.name, get("momentum", 0.0), get("nesterov", False), get("clip_norm", 0.0))
    key = (*static, get("schedule", "exponential"), opt.decay, get("warmup", 0.0), steps_per_epoch, epochs)
    return Optimizer(key, {"lr": opt.lr, "weight_decay": get("weight_decay", 0.0)})


def learning_rate(opt_state) -> jax.Array:
    """The rate of the last update (before any: of the first), or NaN if the state has none."""
    array = lambda _, v: isinstance(v, jnp.ndarray)  # noqa: E731 (not its schedule's state)
    return jnp.asarray(optax.tree.get(opt_state, "learning_rate", jnp.nan, array), jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing=0.0) -> jax.Array:
    """Softmax cross-entropy, integer labels, label smoothing alpha as data (0: the plain loss, bitwise)."""
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    uniform = -jax.nn.log_softmax(logits).mean(-1)
    return ((1 - label_smoothing) * plain + label_smoothing * uniform).mean()


LOSSES = {"cross_entropy": cross_entropy}
