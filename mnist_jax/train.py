"""The training state and the pure step functions every stage shares.

`train_step(state, batch, rng) -> (state, metrics)` is pure and importable; it is not jitted here,
so research code can wrap it (`jax.jit(train_step, donate_argnums=0)`, `jax.vmap`, a scan...).
`train_batch` and `evaluate` are the jitted forms the training loop uses, on device-resident
arrays: batches are sliced on the device and metrics fetched only once per epoch.
"""

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from flax.training import train_state

from mnist_jax import checkpoint, data, metrics as metrics_lib, models
from mnist_jax.config import ConfigError, validate

ADAM_EPS = 1e-7  # Keras's default; optax's is 1e-8
NUM_TRAIN = 60_000  # MNIST's training set size: the default for sizing the lr schedule


class TrainState(train_state.TrainState):
    """Params, optimizer state and step, plus batch-norm statistics ({} without batch norm)."""

    batch_stats: Any = None


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int):
    """Optax optimizer with lr = opt.lr * opt.decay ** epoch, as Keras's LearningRateScheduler.

    `inject_hyperparams` keeps the learning rate actually used in the optimizer state, for logging.
    """
    schedule = optax.exponential_decay(
        init_value=opt.lr, transition_steps=steps_per_epoch, decay_rate=opt.decay, staircase=True
    )
    if opt.name == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    return optax.inject_hyperparams(optax.adam)(learning_rate=schedule, eps=ADAM_EPS)


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, steps_per_epoch: int | None = None
) -> TrainState:
    """Initialise the model and optimizer of `config`. steps_per_epoch sizes the lr schedule."""
    if steps_per_epoch is None:
        steps_per_epoch = (config.data.train_limit or NUM_TRAIN) // config.batch_size
    model = models.build(**config.model)
    variables = model.init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=make_optimizer(config.opt, steps_per_epoch),
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


def eval_step(state: TrainState, batch: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """Per-example loss, correctness and prediction, with batch norm in inference mode."""
    images, labels = batch
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    prediction = jnp.argmax(logits, -1)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        "correct": prediction == labels,
        "prediction": prediction,
    }


@partial(jax.jit, donate_argnums=0)
def train_batch(state, images, labels, idx, rng):
    """train_step on images[idx], labels[idx]: device-resident uint8 data, sliced on the device.

    One call per step. A lax.scan over many steps would save the dispatches, but XLA:CPU runs
    convolutions inside loop bodies several times slower (jax-ml/jax#12868): measured here,
    460 ms/step in a scan against 51 ms/step called one by one.
    """
    return train_step(state, (data.normalize(images[idx]), labels[idx]), rng)


@partial(jax.jit, static_argnames="batch_size")
def evaluate(state, images, labels, batch_size: int = 1000) -> dict[str, jax.Array]:
    """Loss, accuracy and per-example predictions over uint8 images [N,28,28,1], in one call."""
    n = images.shape[0]
    pad = -n % batch_size
    images = jnp.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
    labels = jnp.pad(labels, (0, pad))
    batches = (
        data.normalize(images).reshape(-1, batch_size, *images.shape[1:]),
        labels.reshape(-1, batch_size),
    )
    out = jax.lax.map(partial(eval_step, state), batches)
    out = jax.tree.map(lambda x: x.reshape(-1)[:n], out)
    return {
        "loss": out["loss"].mean(),
        "accuracy": out["correct"].mean(),
        "predictions": out["prediction"],
    }


# Fields a resumed run must share with the checkpoint: they fix shapes, data order or step count.
RESUME_KEYS = ("model", "batch_size", "seed", "data.train_limit")


def _lookup(config, path: str):
    for part in path.split("."):
        config = config.get(part) if config is not None else None
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def _prepare_workdir(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Create the work directory; refuse to resume a run whose model or batching differ."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir}: is a file, not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot write there ({e.strerror})") from None
    old_path = workdir / "config.json"
    if old_path.exists() and any((workdir / "checkpoints").glob("[0-9]*")):
        old = ml_collections.ConfigDict(json.loads(old_path.read_text()))
        for path in RESUME_KEYS:
            was, now = _lookup(old, path), _lookup(config, path)
            if json.dumps(was, default=list) != json.dumps(now, default=list):
                raise ConfigError(
                    f"--workdir {workdir}: holds a run with {path}={was}, not {now}; "
                    "choose another --workdir or remove it to start over"
                )
    old_path.write_text(config.to_json(indent=2) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Train `config.epochs` epochs, evaluating on the test set after each; resume if possible.

    Writes WORKDIR/config.json, appends one line per epoch to WORKDIR/metrics.jsonl and saves a
    checkpoint per epoch in WORKDIR/checkpoints/.
    """
    validate(config)
    workdir = Path(workdir)
    ds = data.load(config.data.dir or None)
    train_x, train_y = ds.train_images, ds.train_labels
    if config.data.train_limit:
        train_x, train_y = train_x[: config.data.train_limit], train_y[: config.data.train_limit]
    test_x, test_y = ds.test_images, ds.test_labels
    if config.data.test_limit:
        test_x, test_y = test_x[: config.data.test_limit], test_y[: config.data.test_limit]
    if config.batch_size > len(train_x):
        raise ConfigError(
            f"--batch-size: {config.batch_size} is larger than the {len(train_x)} training images"
        )
    _prepare_workdir(workdir, config)

    steps_per_epoch = len(train_x) // config.batch_size
    init_rng, data_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    state = create_train_state(config, init_rng, steps_per_epoch)
    metrics_path = workdir / "metrics.jsonl"
    mngr = checkpoint.manager(workdir)
    if mngr.latest_step() is not None:
        state, last = checkpoint.restore_state(mngr, state)
        # Keep each epoch once: drop lines written after the checkpoint, restore a missing one.
        history = [m for m in metrics_lib.read(metrics_path) if m["epoch"] < last["epoch"]]
        metrics_lib.write(metrics_path, history + [last])
        print(f"Resumed {workdir} at epoch {last['epoch']} (step {int(state.step)})")
    elif metrics_path.exists():
        metrics_path.unlink()  # a run that never reached its first checkpoint

    train_x, train_y, test_x, test_y = jax.device_put((train_x, train_y, test_x, test_y))
    start = time.perf_counter()
    for epoch in range(int(state.step) // steps_per_epoch, config.epochs):
        t0 = time.perf_counter()
        batch_idx = np.asarray(data.epoch_batches(data_rng, epoch, len(train_x), config.batch_size))
        step_metrics = []
        for idx in batch_idx:
            state, m = train_batch(state, train_x, train_y, idx, dropout_rng)
            step_metrics.append(m)
        # One transfer per epoch: the loop above never waits for the device.
        step_metrics = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *step_metrics))
        ev = evaluate(state, test_x, test_y)
        row = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "train_loss": float(step_metrics["loss"].mean()),
            "train_accuracy": float(step_metrics["accuracy"].mean()),
            "val_loss": float(ev["loss"]),
            "val_accuracy": float(ev["accuracy"]),
            "learning_rate": float(step_metrics["learning_rate"][-1]),
            "seconds": time.perf_counter() - t0,
        }
        checkpoint.save(mngr, state, row)
        metrics_lib.append(metrics_path, row)
        print(
            f"epoch {row['epoch']:3d}/{config.epochs}  loss {row['train_loss']:.4f}"
            f"  acc {row['train_accuracy']:.2%}  val_loss {row['val_loss']:.4f}"
            f"  val_acc {row['val_accuracy']:.2%}  lr {row['learning_rate']:.3g}"
            f"  {row['seconds']:.1f}s",
            flush=True,
        )
    mngr.wait_until_finished()
    mngr.close()
    print(f"Done in {time.perf_counter() - start:.1f}s; work directory {workdir}")
    return state
