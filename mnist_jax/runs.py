"""A training run's set-up and its progress, on the devices and in its work directory.

`setup` fixes what a run keeps (config, devices, data, random keys, checkpoint manager, metrics
writer) in a `Run`; `Progress` is what training changes and a checkpoint holds; `resume`, `save`
and `close` move it between the devices and the work directory. loop.py trains between them.
"""

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from mnist_jax import checkpoint, data, metrics, models, parallel, train
from mnist_jax.config import ConfigError, validate

STEP_KEYS = ("loss", "accuracy", "learning_rate")  # the per-step metrics a run keeps


def split_data(ds: data.Dataset, config: ml_collections.ConfigDict):
    """(train_x, train_y, test_x, test_y) with the config's limits applied and checked."""
    train_n, test_n = config.data.train_limit or None, config.data.test_limit or None
    arrays = (
        ds.train_images[:train_n],
        ds.train_labels[:train_n],
        ds.test_images[:test_n],
        ds.test_labels[:test_n],
    )
    if config.batch_size > len(arrays[0]):
        raise ConfigError(
            f"--batch-size: {config.batch_size} is larger than the {len(arrays[0])} training images"
        )
    return arrays


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """What a run fixes when it starts: config, work directory, devices, data, keys, files."""

    config: ml_collections.ConfigDict
    workdir: Path
    primary: bool  # process 0 writes the files; every process checkpoints
    sharding: Any  # of the batch over the devices; None on one device (the plain program)
    steps_per_epoch: int
    data_rng: jax.Array
    dropout_rng: jax.Array
    train_x: jax.Array  # the data sets, replicated on every device
    train_y: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    mngr: Any  # ocp.CheckpointManager
    writer: Any  # metrics.Writer on process 0, else metrics.NullWriter


class Progress(NamedTuple):
    """What training changes, and what a checkpoint holds.

    `partial` holds the per-step metrics of the unfinished epoch, so its length is the step
    within the epoch; `last_epoch` is the metrics row of the last finished epoch.
    """

    state: train.TrainState
    partial: dict[str, np.ndarray]
    last_epoch: dict | None = None


def no_steps() -> dict[str, np.ndarray]:
    return {k: np.zeros(0, np.float32) for k in STEP_KEYS}


def step_count(state: train.TrainState) -> int:
    return int(parallel.to_host(state.step))


def setup(config: ml_collections.ConfigDict, workdir: Path) -> tuple[Run, train.TrainState]:
    """Check the config, load the data, prepare the work directory; the initial state."""
    validate(config)
    mesh = parallel.make_mesh(config.devices)
    parallel.check_batch(config.batch_size, mesh)
    primary = parallel.is_primary()
    arrays = split_data(data.load(config.data.dir or None), config)
    if primary:
        checkpoint.prepare_workdir(workdir, config)
    parallel.sync("workdir ready")
    steps_per_epoch = len(arrays[0]) // config.batch_size
    init_rng, data_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    state = train.create_train_state(config, init_rng, steps_per_epoch)
    state = parallel.put_replicated(state, mesh)
    if primary:
        summary = models.summary(models.build(**config.model))
        (workdir / "summary.txt").write_text(summary + "\n")
        print(summary)
        if mesh.size > 1:
            print(
                f"Data-parallel over {mesh.size} {mesh.devices.flat[0].platform} devices in "
                f"{jax.process_count()} process(es): "
                f"{config.batch_size // mesh.size} images per device per step"
            )
    train_x, train_y, test_x, test_y = parallel.put_replicated(arrays, mesh)
    run = Run(
        config=config,
        workdir=workdir,
        primary=primary,
        sharding=parallel.batch_sharding(mesh) if mesh.size > 1 else None,
        steps_per_epoch=steps_per_epoch,
        data_rng=data_rng,
        dropout_rng=dropout_rng,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        mngr=checkpoint.manager(workdir, keep_period=steps_per_epoch, repair=primary),
        writer=metrics.Writer(workdir) if primary else metrics.NullWriter(),
    )
    return run, state


def resume(run: Run, state: train.TrainState) -> Progress:
    """The newest readable checkpoint's progress, or a fresh start; metrics files cut to match."""
    found = checkpoint.restore_latest(run.mngr, state, run.workdir)
    if found is None:
        run.writer.truncate(None, 0)
        return Progress(state, no_steps())
    state, saved = found
    partial = {k: np.asarray(v, np.float32) for k, v in (saved["partial"] or no_steps()).items()}
    step, spe = step_count(state), run.steps_per_epoch
    run.writer.truncate(saved["last_epoch"], step)
    if run.primary:
        print(
            f"Resumed {run.workdir} at step {step} "
            f"(epoch {step // spe + 1}, step {step % spe} of it)"
        )
    return Progress(state, partial, saved["last_epoch"])


def save(run: Run, progress: Progress) -> None:
    run.mngr.wait_until_finished()  # one save in flight at a time
    if run.primary:
        checkpoint.mark_committed(run.workdir)
    p = progress.partial
    partial = {k: v.tolist() for k, v in p.items()} if len(p["loss"]) else None
    saved = {"last_epoch": progress.last_epoch, "partial": partial}
    checkpoint.save(run.mngr, progress.state, saved, step_count(progress.state))


def close(run: Run) -> None:
    run.mngr.wait_until_finished()
    if run.primary:
        checkpoint.mark_committed(run.workdir)
    run.mngr.close()
    run.writer.close()
