"""The training loop: runs from their set-up to their end (docs/design.md, "The loop and its hooks").

A run is a function of (config, seed): the data order of an epoch comes from (seed, epoch), the
dropout key of a step from (seed, step), and a checkpoint holds the unfinished epoch's metrics,
so a resumed run ends bit for bit as the uninterrupted one (tests/test_resume.py kills runs).
"""

import contextlib
import dataclasses
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
from mnist_jax.hooks import Diverged, Interrupted, call, defaults
from mnist_jax.hooks import callbacks as default_callbacks

# What may differ between the runs of one program: the seed, and numbers that are data in the
# state (the optimizer's, optim.py; the loss's, TrainState.loss_args; the average's decay, on in all
# or none), not constants of its program.
MEMBER_FIELDS = ("seed", "opt.lr", "opt.weight_decay", "opt.ema", "loss.label_smoothing")


@dataclasses.dataclass(eq=False)
class Run:
    """One run of a group: what a hook sees."""

    group: "Group"
    index: int  # its place in the group's program
    config: ml_collections.ConfigDict  # as config.json records it: its seed, seeds 1, its data
    workdir: Path
    label: str  # what a line about it calls it: "seed 3", "trial 2"
    mngr: Any = None  # its checkpoint manager
    partial: dict = dataclasses.field(default_factory=dict)  # the unfinished epoch's metrics [done]
    row: dict | None = None  # its row of the last finished epoch
    evaluation: dict | None = None  # the last epoch's {"test", "val"?: train.eval_dataset's}
    stop: int | str | None = None  # a signal: checkpoint and stop now; "epoch": after this epoch

    state = property(lambda self: self.group.take(self.index))
    step = property(lambda self: self.group.step)
    primary = property(lambda self: self.group.primary)


class Group:
    """Runs trained together in one compiled call, vmapped when N > 1, the plain program when N = 1, and what
    they share: the state (stacked over the runs when there are several), the data on the devices, the calls."""

    def __init__(
        self, configs, workdirs, runtime, mesh, arrays, labels=None, summary="", step_fn=None, eval_metrics=()
    ):
        """configs: each run's (member_configs); arrays: {"train", "val"?, "test": (images,
        labels)} on the devices; labels: what lines call the runs (default "seed <s>")."""
        n, first = len(configs), configs[0]
        self.vmap, self.mesh, self.runtime, self.arrays, self.summary = n > 1, mesh, runtime, arrays, summary
        self.step_fn, self.eval_metrics = step_fn or train_lib.train_step, train_lib.EVAL_METRICS + tuple(eval_metrics)
        labels = labels or [f"seed {c.seed}" for c in configs]
        self.runs = [Run(self, i, c, Path(w), lb) for i, (c, w, lb) in enumerate(zip(configs, workdirs, labels))]
        if self.vmap and n % mesh.size:
            raise ConfigError(
                f"--seeds: {n} seeds do not spread over {mesh.size} devices; use a multiple of {mesh.size}, or --devices 1"
            )
        if self.vmap and jax.process_count() > 1:
            raise ConfigError("--seed-mode vmap: one process only; use --seed-mode turn")
        if not self.vmap:
            parallel.check_batch(first.batch_size, mesh)
        self.steps_per_epoch = len(arrays["train"][1]) // first.batch_size if "train" in arrays else 0
        keys = [tuple(jax.random.split(jax.random.PRNGKey(c.seed), 3)) for c in configs]
        self.init_rngs, self.data_rngs, dropout = zip(*keys)
        self.dropout_rngs = self.put(dropout)
        # One run's batch is split over the devices; vmapped runs are spread whole.
        self.sharded = {} if self.vmap else {"sharding": parallel.batch_sharding(mesh) if mesh.size > 1 else None}
        self.shift, self.augment = first.data.augment_shift, train_lib.augmentation(first.data)
        self.unroll = mesh.devices.flat[0].platform == "cpu"  # train_steps' unroll: a loop is slow on the CPU
        self.primary, self.debug_nans, self.compiled, self.compile_s = parallel.is_primary(), first.debug_nans, {}, 0.0
        self.state, self.hooks, self.callbacks, self.error, self.show_summary = None, [], [], None, True

    step = property(lambda self: int(np.ravel(parallel.to_host(self.state.step))[0]))
    signal = property(lambda self: next((r.stop for r in self.runs if isinstance(r.stop, int)), None))  # a run's stop
    done = property(lambda self: len(next(iter(self.runs[0].partial.values()), ())))  # steps of the unfinished epoch

    def put(self, trees: list):
        """One tree per run, placed: stacked over the devices, or replicated (one run)."""
        if not self.vmap:
            return parallel.put_replicated(trees[0], self.mesh)
        # Leaf by leaf: each state's optimizer is its own object, so their tree metadata differ.
        leaves = zip(*(jax.device_get(jax.tree.leaves(t)) for t in trees))
        stacked = jax.tree.unflatten(jax.tree.structure(trees[0]), [np.stack(x) for x in leaves])
        return jax.device_put(stacked, parallel.seed_sharding(self.mesh))

    def take(self, i: int, tree=None):
        """Run i's part of a placed tree (default: the state)."""
        tree = self.state if tree is None else tree
        return jax.tree.map(lambda x: x[i], tree) if self.vmap else tree

    def per_run(self, tree) -> list:
        """A compiled call's output on the host, a tree per run."""
        tree = parallel.to_host(tree)
        return [jax.tree.map(lambda v: v[i], tree) for i in range(len(self.runs))] if self.vmap else [tree]  # noqa: B023

    def _call(self, key, fn, *args, **static):
        """fn (jitted) on args, compiled once per key; under --debug-nans jitted, undonated:
        jax_debug_nans checks jitted calls, not compiled (AOT) ones."""
        if self.debug_nans and fn in train_lib.UNDONATED:
            return train_lib.UNDONATED[fn](*args, **static)
        if key not in self.compiled:
            t = time.perf_counter()
            self.compiled[key] = fn.lower(*args, **static).compile()
            self.compile_s += time.perf_counter() - t
        return self.compiled[key](*args)

    def train(self, order, start: int, steps: int):
        """`steps` steps from row `start` of `order` (Group.order): the metrics on the device."""
        fn = train_lib.train_seeds if self.vmap else train_lib.train_steps
        static = dict(
            steps=steps, shift=self.shift, step=self.step_fn, augment=self.augment, unroll=self.unroll, **self.sharded
        )
        args = (self.state, *self.arrays["train"], order, np.int32(start), self.dropout_rngs)
        self.state, m = self._call(("train", steps), fn, *args, **static)
        return m

    def evaluate(self, split: str) -> list[dict]:
        """`train.eval_dataset` on a split, on the host: a dict per run."""
        fn = train_lib.eval_seeds if self.vmap else train_lib.eval_dataset
        images, labels = self.arrays[split]
        static = dict(metrics=self.eval_metrics, **self.sharded)
        return self.per_run(self._call(("eval", images.shape), fn, self.state, images, labels, **static))

    def order(self, epoch: int):
        """The epoch's batch indices on the device, each run's from its seed: [runs, S, B], or [S, B]."""
        n, b = len(self.arrays["train"][1]), self.runs[0].config.batch_size
        return self.put([np.asarray(data.epoch_batches(r, epoch, n, b)) for r in self.data_rngs])

    def emit(self, method: str, args=lambda run: ()) -> None:
        """The group's callbacks, then each run's hooks (args(run): the method's arguments)."""
        call(self.callbacks, method, self)
        for run in self.runs:
            call(self.hooks, method, run, *args(run))

    # What a person reads: one run is the run; several are seeds (or trials).
    def label(self, i: int) -> str:
        return f"{self.runs[i].label}: " if len(self.runs) > 1 else ""

    where = property(lambda self: self.runs[0].workdir if len(self.runs) == 1 else self.runs[0].workdir.parent)


def member_configs(config, given: list | None, n: int) -> list:
    """Each run's config as it records it (seeds 1): `given`, default seeds config.seed,
    config.seed + 1, ...; ConfigError if they differ in more than MEMBER_FIELDS."""
    given = given or [with_values(config, {"seed": config.seed + i}) for i in range(n)]
    program = lambda c: (
        {k: v for k, v in flags.leaves(c) if k not in (*MEMBER_FIELDS, "name", "workdir", "seeds")}
        | {"opt.ema on": bool(c.opt.get("ema"))}
    )
    for g in given:
        if program(g) != program(given[0]):
            diff = sorted(k for k in program(g) if program(g)[k] != program(given[0]).get(k))
            raise ConfigError(
                f"members trained together differ only in {', '.join(MEMBER_FIELDS)}; these differ in {', '.join(diff)}"
            )
    return [with_values(g, {"seeds": 1}) for g in given]


def with_values(config, values: dict):
    """A copy of config with {dotted path: value} set."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.update_from_flattened_dict(values)
    return c


def split_data(ds: data.Dataset, config: ml_collections.ConfigDict) -> dict:
    """{"train", "val", "test": (images, labels)}, limits applied; "val": data.val_split training
    images drawn with a fixed key, so every seed and resume holds out the same ones (absent at 0)."""
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
        n = len(arrays["train"][1])
        raise ConfigError(f"--batch-size: {config.batch_size} is larger than the {n} training images")
    return arrays if n_val else {k: v for k, v in arrays.items() if k != "val"}


def setup(config, workdirs: list, runtime, members=None, labels=None, step_fn=None, eval_metrics=None) -> Group:
    """Check the config and each work directory (a run of another recipe is refused before
    anything is written: recipe.py), load the data, build the runs' initial states."""
    models.build(**config.model)  # a model field or value the model cannot take: one line
    mesh = parallel.make_mesh(config.devices)
    configs = member_configs(config, members, len(workdirs))
    ds = data.from_config(config.data)
    arrays = split_data(ds, config)
    dataset = data.identity(ds, config.data.digits)  # resumes on the same data
    for c in configs:
        c.dataset = dataset
    step_fn = step_fn or train_lib.step_for(config.loss.name)
    summary = models.summary(train_lib.model_of(configs[0], runtime.conv_grad), dataset["image_shape"])
    metric_fns = sorted((eval_metrics or {}).items())
    runtime = startup.fit_to_run(runtime, config, config.epochs * (len(arrays["train"][1]) // config.batch_size))
    group = Group(
        configs, workdirs, runtime, mesh, parallel.put_replicated(arrays, mesh), labels, summary, step_fn, metric_fns
    )
    spe, platform = group.steps_per_epoch, mesh.devices.flat[0].platform
    ran = dict(devices=mesh.size, processes=jax.process_count(), platform=platform, jax=jax.__version__)
    ran.update(dataclasses.asdict(runtime), seed_mode="vmap" if group.vmap else "turn")
    states = [train_lib.create_train_state(c, r, spe, runtime.conv_grad) for c, r in zip(configs, group.init_rngs)]
    plans = [recipe.check(r.workdir, r.config, ran) for r in group.runs]
    plans = [recipe.find_checkpoint(r.workdir, p, r.config, s, spe) for r, p, s in zip(group.runs, plans, states)]
    parallel.sync("work directories checked")  # every process has read them before any change
    if config.init_from and any(plan.step is None for plan in plans):
        for i, c in enumerate(configs):  # a run that resumes replaces this state
            states[i], source = checkpoint.init_from(states[i], Path(config.init_from), c.seed)
            plans[i] = plans[i]._replace(init=source) if plans[i].step is None else plans[i]
    recipe.prepare_all([r.workdir for r in group.runs], configs, plans)
    for run in group.runs:
        run.mngr = checkpoint.manager(run.workdir, keep_period=spe)
        if group.primary:
            flags.write_atomic(run.workdir / "summary.txt", summary + "\n")
    group.state = group.put(states)
    return group


# The model tables the command in progress printed (`one_summary`): each once a command.
_printed: list[set] = []


@contextlib.contextmanager
def one_summary():
    """Within, loop.train prints each model table once; nested, the outermost's set counts."""
    _printed.append(_printed[-1] if _printed else set())
    try:
        yield
    finally:
        _printed.pop()


def resume(group: Group) -> None:
    """The newest checkpoint all runs have, or a fresh start. Runs save one after another, so a
    group killed between two saves has them one checkpoint apart: all go on from the older one,
    the newer ones deleted (the one deletion a run makes; the same program writes them again)."""
    states = [r.state for r in group.runs]
    found = [recipe.restore_latest(r.mngr, s, r.workdir) for r, s in zip(group.runs, states)]
    steps = [int(f[0].step) if f else 0 for f in found]
    step = min(steps)
    for i, run in enumerate(group.runs):
        if steps[i] > step:
            for s in [s for s in run.mngr.all_steps() if s > step]:
                run.mngr.delete(s)
            found[i] = checkpoint.restore_state(run.mngr, states[i], step) if step else None
    if step:
        group.state = group.put([f[0] for f in found])
        for run, (_, saved) in zip(group.runs, found):
            run.row = metrics.upgrade(saved["last_epoch"])
            run.partial = {k: np.asarray(v, np.float32) for k, v in (saved["partial"] or {}).items()}


def fetch(group: Group, chunk: list, epoch: int) -> list[dict]:
    """A chunk's step metrics on the host, a dict per run appended to its partial; Diverged at
    a NaN or infinite loss (checked on the host: no device op for --debug-nans to stop on)."""
    new = [{k: np.concatenate([m[k] for m in ms]) for k in ms[0]} for ms in zip(*map(group.per_run, chunk))]
    for i, m in enumerate(new):
        bad = np.flatnonzero(~np.isfinite(m["loss"]))
        if len(bad):
            j, kept = bad[0], group.runs[i].mngr.latest_step()
            lr = f" (lr {m['learning_rate'][j]:.3g})" if "learning_rate" in m else ""
            raise Diverged(
                f"{group.label(i)}training loss became {m['loss'][j]} at epoch {epoch + 1}, "
                f"step {epoch * group.steps_per_epoch + group.done + int(j) + 1}{lr}; "
                + (f"last good checkpoint: step {kept}" if kept is not None else "no checkpoint kept")
                + "; try a smaller --opt-lr, or --debug-nans to find the operation",
                member=i,
            )
    for run, m in zip(group.runs, new):
        run.partial = {k: np.concatenate([run.partial[k], v]) if run.partial else v for k, v in m.items()}
    return new


def train_epoch(group: Group, epoch: int) -> None:
    """The epoch's steps (its rest, after a resume); stops early at a signal. A call ends at the next
    multiple of K, a checkpoint or the epoch's end: a function of the step alone, so resuming keeps the calls."""
    config, spe, first = group.runs[0].config, group.steps_per_epoch, epoch * group.steps_per_epoch
    k, every = min(group.runtime.steps_per_call or spe, spe), config.checkpoint_every
    order = group.order(epoch)
    while group.done < spe and group.signal is None:
        done, chunk = group.done, []
        while True:  # calls until host work is due: a log row, a checkpoint, the end, a signal
            end = min(spe, (done // k + 1) * k, done + every - (first + done) % every if every else spe)
            try:
                chunk.append(group.train(order, done, end - done))
            except FloatingPointError as e:  # raised under --debug-nans
                steps, kept = f"{first + done + 1}-{first + end}", group.runs[0].mngr.latest_step()
                raise Diverged(f"{e} at epoch {epoch + 1}, steps {steps}; last good checkpoint: step {kept}") from None
            due = every and (first + end) % every == 0
            logged = end // config.log_every > done // config.log_every
            done = end
            if end == spe or due or logged or group.signal is not None:
                break
        new = fetch(group, chunk, epoch)
        group.emit("after_steps", lambda run: (new[run.index],))


def evaluate(group: Group) -> None:
    """Each run's evaluation: {"test", and "val" with a validation split}."""
    splits = {k: group.evaluate(k) for k in ("test", "val") if k in group.arrays}
    for i, run in enumerate(group.runs):
        run.evaluation = {k: v[i] for k, v in splits.items()}


def row(run: Run, epoch: int, seconds: float) -> dict:
    """The run's row of a finished epoch: the step metrics' means (metrics.LAST: the last
    value), the evaluation's metrics (an array as name_0, name_1, ...), the epoch's seconds."""
    out = {"epoch": epoch + 1, "step": run.step}
    out.update({f"train_{k}": float(v.mean()) for k, v in run.partial.items() if k not in metrics.LAST})
    out.update({k: float(v[-1]) for k, v in run.partial.items() if k in metrics.LAST})
    for split, ev in run.evaluation.items():
        for name, _ in run.group.eval_metrics:
            value = np.ravel(ev[name])
            keys = [f"{split}_{name}"] if np.ndim(ev[name]) == 0 else [f"{split}_{name}_{j}" for j in range(len(value))]
            out.update({key: float(v) for key, v in zip(keys, value)})
    return {**out, "seconds": seconds}


def train(
    config,
    workdirs,
    *,
    runtime=None,
    hooks=(),
    callbacks=(),
    save=True,
    step_fn=None,
    eval_metrics=None,
    members=None,
    labels=None,
) -> Group:
    """Train runs config.seed, config.seed + 1, ... (a work directory each, in one program) for
    config.epochs epochs, evaluating after each; resume if possible. Returns the group.
    runtime: the command's choices (default: validate and resolve here); hooks, callbacks: after
    hooks.defaults (save=False: no checkpoints) and hooks.callbacks; step_fn: the step (one's own
    may return more metrics, logged by name); eval_metrics: {name: fn(logits, labels)}; members:
    each run's config (a sweep's trials), differing only in MEMBER_FIELDS; labels: how lines name them."""
    if runtime is None:
        validate(config)
        runtime = startup.resolve(config, len(workdirs))
    # For this call only: a config value set in a context is part of every jitted function's
    # cache key, so a context always on would compile apart from callers'.
    with contextlib.ExitStack() as stack:
        if config.debug_nans:
            stack.enter_context(jax.debug_nans(True))
        for workdir in workdirs:  # setup locks them (recipe.lock); released however it ends
            stack.callback(recipe.unlock, Path(workdir))
        group = setup(config, workdirs, runtime, members, labels, step_fn, eval_metrics)
        group.hooks, group.callbacks = [*defaults(save), *hooks], [*default_callbacks(), *callbacks]
        resume(group)
        spe, end = group.steps_per_epoch, config.epochs * group.steps_per_epoch
        # The table once a command, and not for a finished run run again; summary.txt has it.
        printed = _printed[-1] if _printed else set()
        group.show_summary = group.step < end and group.summary not in printed
        if group.show_summary:
            printed.add(group.summary)
        try:
            group.emit("on_train_start")
            for epoch in range(group.step // spe, config.epochs):
                t0, c0 = time.perf_counter(), group.compile_s
                train_epoch(group, epoch)
                if group.done == spe:  # the epoch finished (not stopped short by a signal)
                    seconds = time.perf_counter() - t0 - (group.compile_s - c0)
                    evaluate(group)
                    for run in group.runs:
                        run.row, run.partial = row(run, epoch, seconds), {}
                    group.emit("on_epoch_end", lambda run: (run.row, run.evaluation))
                signum = group.signal  # heard after the last epoch's end: the run is complete
                if signum is not None and group.step < end:
                    where = group.where if len(group.runs) > 1 else group.where / "checkpoints"
                    raise Interrupted(
                        signum,
                        f"interrupted ({signal.Signals(signum).name}) at step {group.step}; checkpoint saved in {where}. Resume by running the same command again with --workdir {group.where}",
                    )
                if all(r.stop for r in group.runs):
                    break
            if group.runs[0].evaluation is None:  # nothing left to train: the run had finished
                evaluate(group)
        except BaseException as e:
            group.error = e
            if not (isinstance(e, jax.errors.JaxRuntimeError) and jax.process_count() > 1):
                group.emit("on_train_end")  # not when another process is gone
            raise
        group.emit("on_train_end")
    return group


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> train_lib.TrainState:
    """Train one seed, config.seed, in `workdir` (see train): its final TrainState."""
    return train(config, [workdir]).runs[0].state
