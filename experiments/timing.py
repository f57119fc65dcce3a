"""Timing our own training: images per second of its step, and time to a test accuracy.

`measure_ours` times the loop's compiled call (train.train_steps; train.train_seeds for several
seeds vmapped) on device-resident data and returns one dict: first-step (compile) seconds apart,
then the median images/s over several timed windows, seconds per 60,000-image epoch, and the
process's peak resident memory. The Keras and PyTorch
references (experiments/references.py) report the same dict through `_summary`.
`time_to_accuracy` trains a stage (its seed, schedule and batch) through the training loop
itself, without checkpoints, to a test accuracy.
"""

import resource
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np

from mnist_jax import data, loop, parallel, seeds, startup, train
from mnist_jax.hooks import StopAt


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _summary(name, version, batch, first_step_s, window_seconds, window_steps) -> dict:
    ips = [window_steps * batch / s for s in window_seconds]
    median = statistics.median(ips)
    return {
        "framework": name,
        "version": version,
        "batch_size": batch,
        "first_step_s": round(first_step_s, 3),
        "images_per_s": round(median, 1),
        "window_images_per_s": [round(x, 1) for x in ips],
        "epoch_s": round(60_000 // batch * batch / median, 2),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }


def window_steps_for(batch: int, window_images: int) -> int:
    return max(2, round(window_images / batch))


def _train_arrays(data_dir: str | None):
    ds = data.load(data_dir)
    return ds.train_images, ds.train_labels


def _indices(n: int, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """Batch indices for `steps` steps: shuffled epochs, as training draws them."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch
    epochs = -(-steps // per_epoch)
    idx = np.concatenate([rng.permutation(n)[: per_epoch * batch] for _ in range(epochs)])
    return idx[: steps * batch].reshape(steps, batch).astype(np.int32)


def measure_ours(config, data_dir, windows: int, window_images: int, seeds: int = 1) -> dict:
    """Our training loop's work per step: the compiled call it makes (train.train_steps, K steps
    as startup.resolve picks: 8 unrolled for a conv net on the CPU), on device-resident uint8 data and indices.

    seeds > 1: that many seeds in one vmapped program (train.train_seeds); images/s then counts
    every model's images (models x images per second).
    """
    runtime = startup.resolve(config, seeds)
    images, labels = _train_arrays(data_dir)
    b, n = config.batch_size, len(images)
    k = min(runtime.steps_per_call or n // b, n // b)
    per_window = -(-window_steps_for(b, window_images) // k)  # calls per window
    calls = 3 + windows * per_window
    configs = [loop.with_values(config, {"seed": config.seed + i}) for i in range(seeds)]
    group = loop.Group(
        configs,
        [f"seed_{i}" for i in range(seeds)],
        runtime,
        parallel.make_mesh(1),
        {"train": jax.device_put((images, labels))},
    )
    group.state = group.put([train.create_train_state(config, r, n // b, runtime.conv_grad) for r in group.init_rngs])
    orders = group.put([_indices(n, b, calls * k)] * seeds)

    for i in range(3):  # compile, then warm-up: first calls allocate
        m = group.train(orders, i * k, k)
    jax.block_until_ready(m)
    seconds = []
    for w in range(windows):
        t = time.perf_counter()
        for i in range(3 + w * per_window, 3 + (w + 1) * per_window):
            m = group.train(orders, i * k, k)
        jax.block_until_ready((group.state, m))
        seconds.append(time.perf_counter() - t)
    name = "mnist_jax" if seeds == 1 else f"mnist_jax x{seeds}"
    summary = _summary(name, f"jax {jax.__version__}", b, group.compile_s, seconds, per_window * k * seeds)  # fmt: skip
    summary["epoch_s"] = round(60_000 // b * b * seeds / summary["images_per_s"], 2)  # every seed
    summary.update(device=jax.default_backend(), steps_per_call=k, seeds=seeds, conv_grad=runtime.conv_grad, xla_cpu=runtime.xla_cpu)  # fmt: skip
    return summary


def time_to_accuracy(config, target: float, max_epochs: int, data_dir=None, stop=True,
                     val_split: int = 5000) -> dict:  # fmt: skip
    """Train `config` (its seed, schedule and batch) until the validation accuracy reaches
    `target`, on `val_split` training images held out: the stop is a choice, so the test set
    does not make it; its accuracy is reported beside.

    The training loop itself (seeds.train, in a temporary work directory, no checkpoints),
    evaluating after each epoch. `seconds` counts training; compilation is reported apart as
    `compile_s`. With stop=False, trains all max_epochs (a fixed budget) and reports the first
    epoch that reached the target as `reached_epoch`.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.epochs, config.seeds, config.plots, config.data.val_split = max_epochs, 1, False, val_split  # fmt: skip
    if data_dir:
        config.data.dir = str(data_dir)
    with tempfile.TemporaryDirectory(prefix="mnist_jax_time_") as workdir:
        (r,) = seeds.train(config, workdir, save=False, hooks=[StopAt(target)] if stop else (), dead_units=True)["runs"]
    elapsed = 0.0
    for h in r["history"]:
        elapsed += h["seconds"]
        h["cumulative_s"] = elapsed
    first = next((h for h in r["history"] if h["val_accuracy"] >= target), None)
    return {
        "stage": config.name,
        "seed": config.seed,
        "target": target,
        "val_split": val_split,
        "reached": r["val_accuracy"] >= target,
        "epochs": r["epochs"],
        "seconds": r["seconds"],
        "compile_s": r["compile_s"],
        "val_accuracy": r["val_accuracy"],
        "test_accuracy": r["test_accuracy"],
        "reached_epoch": first["epoch"] if first else None,
        "reached_seconds": round(first["cumulative_s"], 2) if first else None,
        "collapsed_to": r["collapsed_to"],  # the one class, if so
        "dead_units": r["dead_units"],  # relu units 0 on every test image
        "history": [
            {
                "epoch": h["epoch"],
                "seconds": h["cumulative_s"],
                "val_accuracy": h["val_accuracy"],
                "test_accuracy": h["test_accuracy"],
            }
            for h in r["history"]
        ],  # fmt: skip
    }
