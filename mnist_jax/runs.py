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

from mnist_jax import checkpoint, data, metrics, models, parallel, recipe, train
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
    """What training changes, and what a checkpoint holds, for the N seeds of a group.

    `state` is one TrainState, or (vmapped seeds) the N seeds' stacked on a leading axis.
    `partial` holds the per-step metrics of the unfinished epoch, each [N, steps done], so its
    length is the step within the epoch; `last_epoch[i]` is seed i's metrics row of the last
    finished epoch.
    """

    state: train.TrainState
    partial: dict[str, np.ndarray]
    last_epoch: list


def no_steps(n: int = 1) -> dict[str, np.ndarray]:
    return {k: np.zeros((n, 0), np.float32) for k in STEP_KEYS}


def done_steps(progress: Progress) -> int:
    return progress.partial["loss"].shape[1]


def step_count(state: train.TrainState) -> int:
    return int(np.ravel(parallel.to_host(state.step))[0])


def seed_state(state: train.TrainState, i: int, vmap: bool) -> train.TrainState:
    """Seed i's TrainState of a group's state (stacked over seeds when vmapped)."""
    return jax.tree.map(lambda x: x[i], state) if vmap else state


def stack(states: list, sharding) -> train.TrainState:
    """Seeds' TrainStates on a leading axis, placed with `sharding` (the seed axis)."""
    # Leaf by leaf: each state's optimizer is its own object, so their tree metadata differ.
    leaves = zip(*(jax.device_get(jax.tree.leaves(s)) for s in states))
    stacked = jax.tree.unflatten(jax.tree.structure(states[0]), [np.stack(x) for x in leaves])
    return jax.device_put(stacked, sharding)


def setup(config: ml_collections.ConfigDict, workdirs: list[Path], vmap: bool = False):
    """Check the config, load the data, prepare the work directories: (runs, initial state).

    One run per work directory, seeds config.seed, config.seed + 1, ...; vmap: they train in
    one program, their states stacked on a leading axis (spread over the devices when there
    are several: each device trains its own seeds). Else a group is one run. A work directory
    that holds a run of another recipe is refused before anything is written (recipe.py).
    """
    validate(config)
    models.build(**config.model)  # a model field or value the model cannot take: one line
    mesh = parallel.make_mesh(config.devices)
    n = len(workdirs)
    assert vmap or n == 1, "seeds that do not train vmapped train one run at a time"
    if vmap and n % mesh.size:
        raise ConfigError(
            f"--seeds: {n} seeds do not spread over {mesh.size} devices; use a multiple of "
            f"{mesh.size}, or --devices 1"
        )
    if not vmap:
        parallel.check_batch(config.batch_size, mesh)
    primary = parallel.is_primary()
    ds = data.load(config.data.dir or None)
    arrays = split_data(ds, config)
    steps_per_epoch = len(arrays[0]) // config.batch_size
    runtime = dict(devices=mesh.size, processes=jax.process_count(),
                   platform=mesh.devices.flat[0].platform, jax=jax.__version__)  # fmt: skip
    dataset = data.identity(ds, config.data.dir or None)  # recorded: a run resumes on the same
    configs, plans = [], []  # the recipe first: a refused command builds nothing
    for i, workdir in enumerate(workdirs):
        c = ml_collections.ConfigDict(config.to_dict())
        c.seed, c.seeds, c.dataset = config.seed + i, 1, dataset
        configs.append(c)
        plans.append(recipe.check(workdir, c, runtime))  # on every process: reads only
    states, keys = [], []
    for i, (workdir, c) in enumerate(zip(workdirs, configs)):
        init_rng, data_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(c.seed), 3)
        states.append(train.create_train_state(c, init_rng, steps_per_epoch))
        keys.append((data_rng, dropout_rng))
        plans[i] = recipe.find_checkpoint(workdir, plans[i], c, states[i], steps_per_epoch)
    parallel.sync("work directories checked")  # every process has read them before any change
    if config.init_from and any(plan.step is None for plan in plans):
        for i, c in enumerate(configs):  # a seed that resumes replaces this state
            states[i], source = checkpoint.init_from(states[i], Path(config.init_from), c.seed)
            if plans[i].step is None:
                plans[i] = plans[i]._replace(init=source)
    error = None
    if primary:
        try:
            for workdir, c, plan in zip(workdirs, configs, plans):
                recipe.prepare(workdir, c, plan)
        except ConfigError as e:
            error = e
    if not parallel.agree(error is None):  # every process stops, or none
        raise error or ConfigError(f"--workdir: process 0 could not prepare {workdirs[0]}")
    if vmap:
        state = stack(states, parallel.seed_sharding(mesh))
    else:
        state = parallel.put_replicated(states[0], mesh)
    if primary:
        summary = models.summary(models.build(**config.model))
        for workdir in workdirs:
            (workdir / "summary.txt").write_text(summary + "\n")
        print(summary)
        if vmap:
            print(
                f"{n} seeds ({config.seed}-{config.seed + n - 1}) in one vmapped program"
                + (f", {n // mesh.size} per device on {mesh.size} devices" if mesh.size > 1 else "")
            )
        elif mesh.size > 1:
            print(
                f"Data-parallel over {mesh.size} {mesh.devices.flat[0].platform} devices in "
                f"{jax.process_count()} process(es): "
                f"{config.batch_size // mesh.size} images per device per step"
            )
    train_x, train_y, test_x, test_y = parallel.put_replicated(arrays, mesh)
    runs = [
        Run(
            config=c,
            workdir=workdir,
            primary=primary,
            sharding=parallel.batch_sharding(mesh) if mesh.size > 1 and not vmap else None,
            steps_per_epoch=steps_per_epoch,
            data_rng=data_rng,
            dropout_rng=dropout_rng,
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            mngr=checkpoint.manager(workdir, keep_period=steps_per_epoch),
            writer=metrics.Writer(workdir) if primary else metrics.NullWriter(),
        )
        for c, workdir, (data_rng, dropout_rng) in zip(configs, workdirs, keys)
    ]
    return runs, state


def resume(runs: list[Run], state: train.TrainState, vmap: bool = False) -> Progress:
    """The newest checkpoint all seeds have, or a fresh start; metrics files cut to match.

    Seeds save one after another, so a run killed between two seeds' saves has them one
    checkpoint apart: every seed goes on from the older one, and the newer ones are deleted,
    the one deletion a run makes itself: the vmapped program writes them again, bit for bit.
    """
    found = [
        recipe.restore_latest(r.mngr, seed_state(state, i, vmap), r.workdir)
        for i, r in enumerate(runs)
    ]
    step = min((step_count(f[0]) if f else 0) for f in found)
    for i, r in enumerate(runs):
        if found[i] is not None and step_count(found[i][0]) > step:
            for s in [s for s in r.mngr.all_steps() if s > step]:
                r.mngr.delete(s)
            found[i] = (
                checkpoint.restore_state(r.mngr, seed_state(state, i, vmap), step) if step else None
            )
    if step == 0:
        for r in runs:
            r.writer.truncate(None, 0)
        return Progress(state, no_steps(len(runs)), [None] * len(runs))
    saved = [f[1] for f in found]
    partials = [saved_steps(m["partial"]) for m in saved]
    for r, m in zip(runs, saved):
        r.writer.truncate(m["last_epoch"], step)
    if vmap:
        state = stack([f[0] for f in found], jax.tree.leaves(state)[0].sharding)
    else:
        state = found[0][0]
    spe = runs[0].steps_per_epoch
    if runs[0].primary:
        where = runs[0].workdir.parent if vmap else runs[0].workdir
        print(f"Resumed {where} at step {step} (epoch {step // spe + 1}, step {step % spe} of it)")
    partial = {k: np.stack([p[k] for p in partials]) for k in STEP_KEYS}
    return Progress(state, partial, [m["last_epoch"] for m in saved])


def saved_steps(partial: dict | None) -> dict[str, np.ndarray]:
    return {
        k: np.asarray(v, np.float32) for k, v in (partial or {k: [] for k in STEP_KEYS}).items()
    }


def save(runs: list[Run], progress: Progress, vmap: bool = False) -> None:
    """Checkpoint every seed of the group (asynchronously; one save per run in flight)."""
    step = step_count(progress.state)
    for i, run in enumerate(runs):
        run.mngr.wait_until_finished()
        if run.primary:
            checkpoint.mark_committed(run.workdir)
        p = {k: v[i] for k, v in progress.partial.items()}
        partial = {k: v.tolist() for k, v in p.items()} if len(p["loss"]) else None
        saved = {"last_epoch": progress.last_epoch[i], "partial": partial}
        checkpoint.save(run.mngr, seed_state(progress.state, i, vmap), saved, step)


def close(runs: list[Run]) -> None:
    for run in runs:
        run.mngr.wait_until_finished()
        if run.primary:
            checkpoint.mark_committed(run.workdir)
        run.mngr.close()
        run.writer.close()
