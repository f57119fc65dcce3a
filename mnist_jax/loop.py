"""The training loop: a run from its set-up to its end, in one module.

A run is a function of (config, seed): the data order of an epoch comes from (seed, epoch), the
dropout key of a step from (seed, step). A checkpoint stores the model, the optimizer and the
step metrics of the unfinished epoch, so a run resumed from any checkpoint, mid-epoch included,
ends bit for bit as the uninterrupted run (tests/test_resume.py kills runs to check).

`train` is the whole of it. `setup` checks each work directory against the command
(recipe.py), puts the data on the devices and builds the members' states; `resume` restores
them. An epoch puts its batch indices on the device once and runs in compiled calls of K steps
(`train.train_steps`, a lax.scan), ending at multiples of K and at checkpoint steps, so that a
resumed run makes the calls of the uninterrupted one. Between calls the host fetches the step
metrics, stops on a NaN and calls the hooks; after the epoch, the test set's evaluation is one
compiled call. Everything else (files, checkpoints, signals, printing, plots) is a hook
(hooks.py). `Members` is the one place that knows how many runs train together, and how.
"""

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from mnist_jax import checkpoint, data, flags, metrics, models, parallel, recipe, startup
from mnist_jax import train as train_lib  # train.py: the pure step, its compiled forms
from mnist_jax.config import ConfigError, validate
from mnist_jax.hooks import call, defaults
from mnist_jax.members import Members, member_configs


class Diverged(Exception):
    """The training loss became NaN or infinite (in member `member`, when known)."""

    def __init__(self, message: str, member: int | None = None):
        super().__init__(message)
        self.member = member


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run saved a checkpoint and stopped."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclasses.dataclass(eq=False)
class Run:
    """A group's run: what it fixes at its start, and what training changes. Hooks read it."""

    config: ml_collections.ConfigDict  # resolved (startup.resolve); members' seeds from .seed
    members: Members
    steps_per_epoch: int
    arrays: dict  # {"train", "val" (with data.val_split), "test": (images, labels)}, replicated
    mngrs: list  # a checkpoint manager per member
    state: Any  # the TrainState, stacked over members when they are vmapped
    primary: bool  # process 0: writes the files; every process trains and checkpoints
    summary: str  # the model's table
    recorded: list  # each member's recipe as its config.json records it (saved in checkpoints)
    show_summary: bool = True  # print it: not twice a command, nor with nothing left to train
    step_fn: Any = train_lib.train_step
    eval_metrics: tuple = train_lib.EVAL_METRICS
    partial: dict = dataclasses.field(default_factory=dict)  # the epoch's step metrics [N, done]
    rows: list = None  # each member's row of its last finished epoch
    evaluation: dict | None = None  # the last epoch's: {"test", "val"?: Members.evaluate}
    interrupt: int | None = None  # a signal heard (hooks.Preemption): ends the call early
    stop: int | None = None  # the signal to stop at: checkpoint and stop
    finished: bool = False  # stop after this epoch (hooks.StopAt)
    error: BaseException | None = None

    @property
    def step(self) -> int:
        return int(np.ravel(parallel.to_host(self.state.step))[0])

    @property
    def done(self) -> int:
        """Steps done in the unfinished epoch."""
        return next(iter(self.partial.values())).shape[1] if self.partial else 0


def split_data(ds: data.Dataset, config: ml_collections.ConfigDict) -> dict:
    """{"train", "val", "test": (images, labels)}, the config's split and limits applied: the
    validation images are data.val_split training images drawn once (a fixed key, not the
    seed's), so every seed and every resume holds out the same ones; "val" is absent without."""
    n_val, n_train = config.data.val_split, len(ds.train_labels)
    if n_val >= n_train:
        raise ConfigError(f"--data-val-split: {n_val} leaves none of the {n_train} training images")
    held = np.zeros(n_train, bool)
    held[np.random.default_rng(0).permutation(n_train)[:n_val]] = True
    train_n, test_n = config.data.train_limit or None, config.data.test_limit or None
    arrays = {
        "train": (ds.train_images[~held][:train_n], ds.train_labels[~held][:train_n]),
        "val": (ds.train_images[held], ds.train_labels[held]),
        "test": (ds.test_images[:test_n], ds.test_labels[:test_n]),
    }
    if config.batch_size > len(arrays["train"][1]):
        raise ConfigError(
            f"--batch-size: {config.batch_size} is larger than the {len(arrays['train'][1])} training images"
        )
    return arrays if n_val else {k: v for k, v in arrays.items() if k != "val"}


def setup(
    given: ml_collections.ConfigDict,
    config,
    workdirs: list,
    vmap: bool,
    members_given: list | None = None,
    labels: list | None = None,
) -> Run:
    """Check the config and each work directory (a run of another recipe is refused before
    anything is written: recipe.py), load the data, build the members' initial states.
    members_given: each member's config as given (see train)."""
    validate(config)
    models.build(**config.model)  # a model field or value the model cannot take: one line
    mesh = parallel.make_mesh(config.devices)
    members_given = members_given or member_configs(given, None, len(workdirs))
    members = Members(config, workdirs, mesh, vmap, member_configs(config, members_given, 0), labels)
    ds = data.from_config(config.data)
    arrays = split_data(ds, config)
    spe = len(arrays["train"][1]) // config.batch_size
    runtime = dict(
        devices=mesh.size,
        processes=jax.process_count(),
        platform=mesh.devices.flat[0].platform,
        jax=jax.__version__,
        steps_per_call=config.steps_per_call,
        conv_grad=config.conv_grad,
        seed_mode=members.mode,
    )
    dataset = config.dataset = data.identity(ds, config.data.digits)  # resumes on the same
    for c in members.configs:  # each member's state is built for these data
        c.dataset = dataset
    recorded = []  # as the command gives them: config.json; the resolved choices are runtime's
    for g in members_given:
        c = ml_collections.ConfigDict(g.to_dict())
        c.seeds, c.dataset = 1, dataset
        recorded.append(c)
    plans = [recipe.check(w, c, runtime) for w, c in zip(members.workdirs, recorded)]
    states = [train_lib.create_train_state(c, r, spe) for c, r in zip(members.configs, members.init_rngs)]
    plans = [recipe.find_checkpoint(w, p, c, s, spe) for w, p, c, s in zip(members.workdirs, plans, recorded, states)]
    parallel.sync("work directories checked")  # every process has read them before any change
    if config.init_from and any(plan.step is None for plan in plans):
        for i, seed in enumerate(members.seeds):  # a member that resumes replaces this state
            states[i], source = checkpoint.init_from(states[i], Path(config.init_from), seed)
            plans[i] = plans[i]._replace(init=source) if plans[i].step is None else plans[i]
    recipe.prepare_all(members.workdirs, recorded, plans)
    summary = models.summary(train_lib.model_of(config), dataset["image_shape"])
    if parallel.is_primary():
        for workdir in members.workdirs:
            flags.write_atomic(workdir / "summary.txt", summary + "\n")
    return Run(
        config=config,
        members=members,
        steps_per_epoch=spe,
        arrays=parallel.put_replicated(arrays, mesh),
        state=members.put(states),
        mngrs=[checkpoint.manager(w, keep_period=spe) for w in members.workdirs],
        primary=parallel.is_primary(),
        summary=summary,
        rows=[None] * len(workdirs),
        recorded=[json.loads(c.to_json()) for c in recorded],
    )


# The model tables printed by the command in progress (`one_summary`): a command that trains
# several runs (seeds in turn, a sweep's trials) prints each table once.
_printed: list[set] = []


@contextlib.contextmanager
def one_summary():
    """Within, loop.train prints each model table once; nested, the outermost's set counts."""
    outer = bool(_printed)
    if not outer:
        _printed.append(set())
    try:
        yield
    finally:
        if not outer:
            _printed.pop()


def resume(run: Run) -> None:
    """The newest checkpoint all members have, or a fresh start.

    Members save one after another, so a run killed between two members' saves has them one
    checkpoint apart: every member goes on from the older one, and the newer ones are deleted,
    the one deletion a run makes itself: the vmapped program writes them again, bit for bit.
    """
    members = run.members
    states = [members.take(run.state, i) for i in range(len(run.mngrs))]
    found = [recipe.restore_latest(m, s, w) for m, s, w in zip(run.mngrs, states, members.workdirs)]
    steps = [int(f[0].step) if f else 0 for f in found]
    step = min(steps)
    for i, mngr in enumerate(run.mngrs):
        if steps[i] > step:
            for s in [s for s in mngr.all_steps() if s > step]:
                mngr.delete(s)
            found[i] = checkpoint.restore_state(mngr, states[i], step) if step else None
    if step:
        run.state = members.put([f[0] for f in found])
        run.rows = [metrics.upgrade(f[1]["last_epoch"]) for f in found]
        partials = [f[1]["partial"] or {} for f in found]
        run.partial = {k: np.stack([np.asarray(p[k], np.float32) for p in partials]) for k in partials[0]}


def call_end(config, k: int, done: int, step: int, steps_per_epoch: int) -> int:
    """The step of the epoch where the call starting at `done` ends: the next multiple of K, a
    checkpoint or the epoch's end. A function of the step alone, so resuming keeps the calls."""
    ends = [steps_per_epoch, (done // k + 1) * k]
    if config.checkpoint_every:
        ends.append(done + config.checkpoint_every - step % config.checkpoint_every)
    return min(ends)


def fetch(run: Run, chunk: list, epoch: int) -> dict:
    """A chunk's step metrics on the host, each [members, steps], appended to run.partial;
    Diverged at a NaN or infinite loss."""
    # Joined on the host: no device op that --debug-nans would stop on before this check.
    host = run.members.to_host(chunk)
    new = {k: np.concatenate([m[k] for m in host], axis=1) for k in host[0]}
    bad = np.argwhere(~np.isfinite(new["loss"]))
    if len(bad):
        i, j = bad[0]
        step = epoch * run.steps_per_epoch + run.done + int(j) + 1
        kept = run.mngrs[i].latest_step()
        lr = f" (lr {new['learning_rate'][i, j]:.3g})" if "learning_rate" in new else ""
        raise Diverged(
            f"{run.members.label(i)}training loss became {new['loss'][i, j]} at epoch {epoch + 1}, "
            f"step {step}{lr}; "
            + (f"last good checkpoint: step {kept}" if kept is not None else "no checkpoint kept")
            + "; try a smaller --opt-lr, or --debug-nans to find the operation",
            member=int(i),
        )
    run.partial = {k: np.concatenate([run.partial[k], v], 1) if run.partial else v for k, v in new.items()}
    return new


def train_epoch(run: Run, epoch: int, hook_list: list) -> None:
    """The epoch's steps (its rest, after a resume); stops early at a signal."""
    config, spe = run.config, run.steps_per_epoch
    k = min(config.steps_per_call or spe, spe)
    x, y = run.arrays["train"]
    order = run.members.order(epoch, len(x), config.batch_size)
    while run.done < spe and run.stop is None:
        done, chunk = run.done, []
        while True:  # calls until host work is due: a log row, a checkpoint, the end, a signal
            end = call_end(config, k, done, epoch * spe + done, spe)
            try:
                run.state, m = run.members.train(run.state, x, y, order, done, end - done, config, run.step_fn)
            except FloatingPointError as e:  # raised under --debug-nans
                raise Diverged(
                    f"{e} at epoch {epoch + 1}, steps {epoch * spe + done + 1}-{epoch * spe + end}; last good checkpoint: step {run.mngrs[0].latest_step()}"
                ) from None
            chunk.append(m)
            due = config.checkpoint_every and (epoch * spe + end) % config.checkpoint_every == 0
            logged = end // config.log_every > done // config.log_every
            done = end
            if end == spe or due or logged or run.interrupt is not None:
                break
        call(hook_list, "after_steps", run, fetch(run, chunk, epoch))


def evaluate(run: Run) -> dict:
    """{"test", and "val" with a validation split: Members.evaluate on it}."""
    splits = [k for k in ("test", "val") if k in run.arrays]
    return {k: run.members.evaluate(run.state, *run.arrays[k], run.eval_metrics) for k in splits}


def end_epoch(run: Run, epoch: int, seconds: float, hook_list: list) -> None:
    """Evaluate the finished epoch, make each member's row and call the hooks."""
    evaluation = evaluate(run)
    rows = []
    for i in range(len(run.rows)):
        row = {"epoch": epoch + 1, "step": run.step}
        row.update({f"train_{k}": float(v[i].mean()) for k, v in run.partial.items() if k not in metrics.LAST})
        row.update({k: float(v[i, -1]) for k, v in run.partial.items() if k in metrics.LAST})
        for split, ev in evaluation.items():
            for name, _ in run.eval_metrics:  # an array: name_0, name_1, ...
                value = np.ravel(ev[name][i])
                keys = (
                    [f"{split}_{name}"]
                    if np.ndim(ev[name][i]) == 0
                    else [f"{split}_{name}_{j}" for j in range(len(value))]
                )
                row.update({key: float(v) for key, v in zip(keys, value)})
        rows.append({**row, "seconds": seconds})
    run.partial, run.rows, run.evaluation = {}, rows, evaluation
    call(hook_list, "on_epoch_end", run, rows, evaluation)


@contextlib.contextmanager
def _locked(workdirs: list):
    """Within: the work directories' locks, once setup takes them (recipe.lock), released at
    the end however it ends."""
    try:
        yield
    finally:
        for workdir in workdirs:
            recipe.unlock(Path(workdir))


def train(
    config: ml_collections.ConfigDict,
    workdirs: list,
    vmap: bool = False,
    *,
    hooks: tuple = (),
    save: bool = True,
    step_fn=None,
    eval_metrics: dict | None = None,
    members: list | None = None,
    labels: list | None = None,
) -> Run:
    """Train members config.seed, config.seed + 1, ... (one per work directory; several only
    vmapped) for config.epochs epochs, evaluating on the test set after each; resume if possible.

    hooks: the caller's, called after the built-in ones (hooks.defaults; save=False: no
    checkpoints). step_fn: the step (train.train_step with config.loss's loss; a researcher's own
    may return more metrics, logged by name). eval_metrics: {name: fn(logits, labels)}, beside loss and accuracy.
    members: each member's config (default: config with seeds config.seed, + 1, ...), differing
    only in members.MEMBER_FIELDS (a sweep's trials); labels: how lines name them.
    Each work directory gets config.json, summary.txt, metrics.jsonl, train_steps.jsonl,
    tensorboard/ and checkpoints/. Returns the run: its state, rows and last evaluation.
    """
    # For this call only; only when asked: a config value set in a context is part of every
    # jitted function's cache key, so a context always on would compile apart from callers'.
    with (
        jax.debug_nans(True) if config.debug_nans else contextlib.nullcontext(),
        _locked(workdirs),
    ):
        run = setup(config, startup.resolve(config), workdirs, vmap, members, labels)
        run.step_fn = step_fn or train_lib.step_for(config.loss.name)
        run.eval_metrics = train_lib.EVAL_METRICS + tuple(sorted((eval_metrics or {}).items()))
        resume(run)
        hook_list, spe = [*defaults(save), *hooks], run.steps_per_epoch
        # The table once a command, and not for a finished run run again; summary.txt has it.
        printed = _printed[-1] if _printed else set()
        run.show_summary = run.step < config.epochs * spe and run.summary not in printed
        if run.show_summary:
            printed.add(run.summary)
        try:
            call(hook_list, "on_train_start", run)
            for epoch in range(run.step // spe, config.epochs):
                t0, c0 = time.perf_counter(), run.members.compile_s
                train_epoch(run, epoch, hook_list)
                if run.done == spe:  # the epoch finished (not stopped short by a signal)
                    seconds = time.perf_counter() - t0 - (run.members.compile_s - c0)
                    end_epoch(run, epoch, seconds, hook_list)
                if run.stop is not None:
                    name, where = signal.Signals(run.stop).name, run.members.where
                    raise Interrupted(
                        run.stop,
                        f"interrupted ({name}) at step {run.step}; checkpoint saved in {run.members.saved_in}. Resume by running the same command again with --workdir {where}",
                    )
                if run.finished:
                    break
            if run.evaluation is None:  # nothing left to train: the run had finished
                run.evaluation = evaluate(run)
        except BaseException as e:
            run.error = e
            if not (isinstance(e, jax.errors.JaxRuntimeError) and jax.process_count() > 1):
                call(hook_list, "on_train_end", run)  # not when another process is gone
            raise
        call(hook_list, "on_train_end", run)
    return run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> train_lib.TrainState:
    """Train one seed, config.seed, in `workdir` (see train): its final TrainState."""
    return train(config, [workdir]).state
