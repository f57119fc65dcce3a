"""The training loop: runs from their set-up to their end, in one module.

A run is a function of (config, seed): the data order of an epoch comes from (seed, epoch), the
dropout key of a step from (seed, step). A checkpoint stores the training state and the step
metrics of the unfinished epoch, so a run resumed from any checkpoint, mid-epoch included, ends
bit for bit as the uninterrupted run (tests/test_resume.py kills runs to check).

A `Run` is one member (a seed, a sweep's trial): its config, work directory, checkpoints and
rows. A `Group` trains N runs through one compiled call, vmapped when N > 1 and the plain
program when N = 1 (so a run alone is bit for bit what it is by itself), and gives each run its
slice of the step metrics and the evaluation. `train` is the whole of it: `setup` checks each
work directory against the command (recipe.py), puts the data on the devices and builds the
states; `resume` restores them. An epoch runs in compiled calls of K steps (`train.train_steps`,
a lax.scan), ending at multiples of K and at checkpoint steps, so that a resumed run makes the
calls of the uninterrupted one. Between calls the host fetches the step metrics, stops on a NaN
and calls the hooks (hooks.py): each run's hooks, and the group's callbacks (what reports over
the runs together: the printed lines, a signal's stop, a sweep's pruning).
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
# state (the optimizer's, optim.py; the loss's, TrainState.loss_args), not constants of its program.
MEMBER_FIELDS = ("seed", "opt.lr", "opt.weight_decay", "loss.label_smoothing")


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

    @property
    def state(self):
        return self.group.take(self.index)

    @property
    def step(self) -> int:
        return self.group.step

    @property
    def primary(self) -> bool:
        return self.group.primary


class Group:
    """Runs trained together in one compiled program, and what they share: the state (stacked
    over the runs when there are several), the data on the devices, the compiled calls."""

    def __init__(
        self,
        configs: list,
        workdirs: list,
        runtime: startup.Runtime,
        mesh,
        arrays: dict,
        labels: list | None = None,
        summary: str = "",
        step_fn=train_lib.train_step,
        eval_metrics: tuple = train_lib.EVAL_METRICS,
    ):
        """configs: each run's (member_configs); arrays: {"train", "val"?, "test": (images,
        labels)} on the devices; labels: what lines call the runs (default "seed <s>")."""
        n, first = len(configs), configs[0]
        self.vmap, self.mesh, self.runtime, self.arrays, self.summary = n > 1, mesh, runtime, arrays, summary
        self.step_fn, self.eval_metrics = step_fn, eval_metrics
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
        self.sharding = parallel.batch_sharding(mesh) if mesh.size > 1 and not self.vmap else None
        self.shift, self.debug_nans = first.data.augment_shift, first.debug_nans
        self.primary, self.compiled, self.compile_s = parallel.is_primary(), {}, 0.0
        self.state, self.hooks, self.callbacks, self.error, self.show_summary = None, [], [], None, True

    @property
    def step(self) -> int:
        return int(np.ravel(parallel.to_host(self.state.step))[0])

    @property
    def signal(self) -> int | None:
        """The signal a run stops at, if any."""
        return next((r.stop for r in self.runs if isinstance(r.stop, int)), None)

    @property
    def done(self) -> int:
        """Steps done in the unfinished epoch."""
        return len(next(iter(self.runs[0].partial.values()), ()))

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

    def _compiled(self, key, lower):
        if key not in self.compiled:
            t = time.perf_counter()
            self.compiled[key] = lower().compile()
            self.compile_s += time.perf_counter() - t
        return self.compiled[key]

    def train(self, order, start: int, steps: int):
        """`steps` steps from row `start` of `order` (Group.order): the metrics on the device."""
        args = (self.state, *self.arrays["train"], order, np.int32(start), self.dropout_rngs)
        static = dict(steps=steps, shift=self.shift, step=self.step_fn)
        fn = train_lib.train_seeds if self.vmap else train_lib.train_steps
        if not self.vmap:
            static["sharding"] = self.sharding
        if self.debug_nans:  # jax_debug_nans checks jitted calls, not compiled (AOT) ones
            self.state, m = train_lib.UNDONATED[fn](*args, **static)
        else:
            self.state, m = self._compiled(("train", steps), lambda: fn.lower(*args, **static))(*args)
        return m

    def evaluate(self, split: str) -> list[dict]:
        """`train.eval_dataset` on a split, on the host: a dict per run."""
        fn, static = train_lib.eval_seeds, dict(metrics=self.eval_metrics)
        if not self.vmap:
            fn, static = train_lib.eval_dataset, dict(static, sharding=self.sharding)
        images, labels = self.arrays[split]
        lower = lambda: fn.lower(self.state, images, labels, **static)  # noqa: E731
        out = self.to_host(self._compiled(("eval", images.shape), lower)(self.state, images, labels))
        return [jax.tree.map(lambda v: v[i], out) for i in range(len(self.runs))]  # noqa: B023

    def to_host(self, tree):
        """A tree of the compiled calls' outputs on the host, each with a leading runs axis."""
        tree = parallel.to_host(tree)
        return tree if self.vmap else jax.tree.map(lambda v: v[None], tree)

    def order(self, epoch: int):
        """The epoch's batch indices on the device, each run's from its seed: [runs, S, B]
        stacked, or one run's [S, B]."""
        n, b = len(self.arrays["train"][1]), self.runs[0].config.batch_size
        return self.put([np.asarray(data.epoch_batches(r, epoch, n, b)) for r in self.data_rngs])

    def emit(self, method: str, args=lambda run: ()) -> None:
        """The group's callbacks, then each run's hooks (args(run): the method's arguments)."""
        call(self.callbacks, method, self)
        for run in self.runs:
            call(self.hooks, method, run, *args(run))

    # What a person reads: one run is the run; several are seeds and their spread.
    def label(self, i: int) -> str:
        return f"{self.runs[i].label}: " if len(self.runs) > 1 else ""

    @property
    def where(self) -> Path:
        first = self.runs[0].workdir
        return first if len(self.runs) == 1 else first.parent

    @property
    def where_all(self) -> str:
        if len(self.runs) == 1:
            return f"work directory {self.where}"
        if not self.runs[0].label.startswith("seed "):  # a sweep's trials
            return f"work directories {', '.join(str(r.workdir) for r in self.runs)}"
        return f"work directories {self.where}/seed_*"

    def spread(self, values, fmt: str, full: bool = False) -> str:
        """Runs' values: the one, or their median (and range: full)."""
        values = np.asarray(values, np.float64)
        if len(values) == 1:
            return format(values[0], fmt)
        extra = f" ({format(values.min(), fmt)} to {format(values.max(), fmt)})" if full else ""
        return f"{format(np.median(values), fmt)} median{extra}"

    def describe(self) -> list[str]:
        n, devices, labels = len(self.runs), self.mesh.size, [r.label for r in self.runs]
        if self.vmap:
            per = f", {n // devices} per device on {devices} devices" if devices > 1 else ""
            seeds = [r.config.seed for r in self.runs]
            which = (
                f"{n} seeds ({seeds[0]}-{seeds[-1]})"
                if labels[0].startswith("seed ")
                else f"{n} members ({', '.join(labels)})"
            )
            return [f"{which} in one vmapped program{per}"]
        if devices > 1:
            return [
                f"Data-parallel over {devices} {self.mesh.devices.flat[0].platform} devices in "
                f"{jax.process_count()} process(es): {self.runs[0].config.batch_size // devices} images per device "
                "per step"
            ]
        return []


def member_configs(config, given: list | None, n: int) -> list:
    """Each run's config as it records it (seeds 1): `given`, default seeds config.seed,
    config.seed + 1, ...; ConfigError if they differ in more than MEMBER_FIELDS."""
    given = given or [with_values(config, {"seed": config.seed + i}) for i in range(n)]
    program = lambda c: {k: v for k, v in flags.leaves(c) if k not in (*MEMBER_FIELDS, "name", "workdir", "seeds")}  # noqa: E731
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
    config: ml_collections.ConfigDict,
    workdirs: list,
    runtime: startup.Runtime,
    members: list | None = None,
    labels: list | None = None,
    step_fn=None,
    eval_metrics: dict | None = None,
) -> Group:
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
    group = Group(
        configs,
        workdirs,
        runtime,
        mesh,
        parallel.put_replicated(arrays, mesh),
        labels,
        models.summary(train_lib.model_of(configs[0], runtime.conv_grad), dataset["image_shape"]),
        step_fn or train_lib.step_for(config.loss.name),
        train_lib.EVAL_METRICS + tuple(sorted((eval_metrics or {}).items())),
    )
    spe = group.steps_per_epoch
    recorded = dict(
        devices=mesh.size,
        processes=jax.process_count(),
        platform=mesh.devices.flat[0].platform,
        jax=jax.__version__,
        steps_per_call=runtime.steps_per_call,
        conv_grad=runtime.conv_grad,
        seed_mode="vmap" if group.vmap else "turn",
    )
    states = [train_lib.create_train_state(c, r, spe, runtime.conv_grad) for c, r in zip(configs, group.init_rngs)]
    plans = []
    for run, state in zip(group.runs, states):
        plan = recipe.check(run.workdir, run.config, recorded)
        plans.append(recipe.find_checkpoint(run.workdir, plan, run.config, state, spe))
    parallel.sync("work directories checked")  # every process has read them before any change
    if config.init_from and any(plan.step is None for plan in plans):
        for i, c in enumerate(configs):  # a run that resumes replaces this state
            states[i], source = checkpoint.init_from(states[i], Path(config.init_from), c.seed)
            plans[i] = plans[i]._replace(init=source) if plans[i].step is None else plans[i]
    recipe.prepare_all([r.workdir for r in group.runs], configs, plans)
    for run in group.runs:
        run.mngr = checkpoint.manager(run.workdir, keep_period=spe)
        if group.primary:
            flags.write_atomic(run.workdir / "summary.txt", group.summary + "\n")
    group.state = group.put(states)
    return group


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


def resume(group: Group) -> None:
    """The newest checkpoint all runs have, or a fresh start.

    Runs save one after another, so a group killed between two runs' saves has them one
    checkpoint apart: every run goes on from the older one, and the newer ones are deleted,
    the one deletion a run makes itself: the vmapped program writes them again, bit for bit.
    """
    runs = group.runs
    states = [r.state for r in runs]
    found = [recipe.restore_latest(r.mngr, s, r.workdir) for r, s in zip(runs, states)]
    steps = [int(f[0].step) if f else 0 for f in found]
    step = min(steps)
    for i, run in enumerate(runs):
        if steps[i] > step:
            for s in [s for s in run.mngr.all_steps() if s > step]:
                run.mngr.delete(s)
            found[i] = checkpoint.restore_state(run.mngr, states[i], step) if step else None
    if step:
        group.state = group.put([f[0] for f in found])
        for run, (_, saved) in zip(runs, found):
            run.row = metrics.upgrade(saved["last_epoch"])
            run.partial = {k: np.asarray(v, np.float32) for k, v in (saved["partial"] or {}).items()}


def call_end(config, k: int, done: int, step: int, steps_per_epoch: int) -> int:
    """The step of the epoch where the call starting at `done` ends: the next multiple of K, a
    checkpoint or the epoch's end. A function of the step alone, so resuming keeps the calls."""
    ends = [steps_per_epoch, (done // k + 1) * k]
    if config.checkpoint_every:
        ends.append(done + config.checkpoint_every - step % config.checkpoint_every)
    return min(ends)


def fetch(group: Group, chunk: list, epoch: int) -> list[dict]:
    """A chunk's step metrics on the host, a dict per run, each appended to its run's partial;
    Diverged at a NaN or infinite loss."""
    # Joined on the host: no device op that --debug-nans would stop on before this check.
    host = group.to_host(chunk)
    new = {k: np.concatenate([m[k] for m in host], axis=1) for k in host[0]}
    bad = np.argwhere(~np.isfinite(new["loss"]))
    if len(bad):
        i, j = bad[0]
        step = epoch * group.steps_per_epoch + group.done + int(j) + 1
        kept = group.runs[i].mngr.latest_step()
        lr = f" (lr {new['learning_rate'][i, j]:.3g})" if "learning_rate" in new else ""
        raise Diverged(
            f"{group.label(i)}training loss became {new['loss'][i, j]} at epoch {epoch + 1}, "
            f"step {step}{lr}; "
            + (f"last good checkpoint: step {kept}" if kept is not None else "no checkpoint kept")
            + "; try a smaller --opt-lr, or --debug-nans to find the operation",
            member=int(i),
        )
    mine = [{k: v[i] for k, v in new.items()} for i in range(len(group.runs))]
    for run, m in zip(group.runs, mine):
        run.partial = {k: np.concatenate([run.partial[k], v]) if run.partial else v for k, v in m.items()}
    return mine


def train_epoch(group: Group, epoch: int) -> None:
    """The epoch's steps (its rest, after a resume); stops early at a signal."""
    config, spe = group.runs[0].config, group.steps_per_epoch
    k = min(group.runtime.steps_per_call or spe, spe)
    order = group.order(epoch)
    while group.done < spe and group.signal is None:
        done, chunk = group.done, []
        while True:  # calls until host work is due: a log row, a checkpoint, the end, a signal
            end = call_end(config, k, done, epoch * spe + done, spe)
            try:
                chunk.append(group.train(order, done, end - done))
            except FloatingPointError as e:  # raised under --debug-nans
                raise Diverged(
                    f"{e} at epoch {epoch + 1}, steps {epoch * spe + done + 1}-{epoch * spe + end}; last good checkpoint: step {group.runs[0].mngr.latest_step()}"
                ) from None
            due = config.checkpoint_every and (epoch * spe + end) % config.checkpoint_every == 0
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
    """The run's metrics row of a finished epoch: the step metrics' means (metrics.LAST: the
    last value), the evaluation's, the epoch's seconds."""
    out = {"epoch": epoch + 1, "step": run.step}
    out.update({f"train_{k}": float(v.mean()) for k, v in run.partial.items() if k not in metrics.LAST})
    out.update({k: float(v[-1]) for k, v in run.partial.items() if k in metrics.LAST})
    for split, ev in run.evaluation.items():
        for name, _ in run.group.eval_metrics:  # an array: name_0, name_1, ...
            value = np.ravel(ev[name])
            keys = [f"{split}_{name}"] if np.ndim(ev[name]) == 0 else [f"{split}_{name}_{j}" for j in range(len(value))]
            out.update({key: float(v) for key, v in zip(keys, value)})
    return {**out, "seconds": seconds}


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
    *,
    runtime: startup.Runtime | None = None,
    hooks: tuple = (),
    callbacks: tuple = (),
    save: bool = True,
    step_fn=None,
    eval_metrics: dict | None = None,
    members: list | None = None,
    labels: list | None = None,
) -> Group:
    """Train runs config.seed, config.seed + 1, ... (one per work directory, together in one
    program) for config.epochs epochs, evaluating after each; resume if possible.

    runtime: the command's choices (default: startup.resolve, after validating the config).
    hooks: each run's, after the built-in ones (hooks.defaults; save=False: no checkpoints);
    callbacks: the group's, after hooks.callbacks. step_fn: the step (train.train_step with
    config.loss's loss; a researcher's own may return more metrics, logged by name).
    eval_metrics: {name: fn(logits, labels)}, beside loss and accuracy. members: each run's
    config (default: config with seeds config.seed, + 1, ...), differing only in MEMBER_FIELDS
    (a sweep's trials); labels: how lines name them. Each work directory gets config.json,
    summary.txt, metrics.jsonl, train_steps.jsonl, tensorboard/ and checkpoints/. Returns the
    group: its runs, their rows and last evaluation.
    """
    if runtime is None:
        validate(config)
        runtime = startup.resolve(config, len(workdirs))
    # For this call only; only when asked: a config value set in a context is part of every
    # jitted function's cache key, so a context always on would compile apart from callers'.
    with (
        jax.debug_nans(True) if config.debug_nans else contextlib.nullcontext(),
        _locked(workdirs),
    ):
        group = setup(config, workdirs, runtime, members, labels, step_fn, eval_metrics)
        group.hooks, group.callbacks = [*defaults(save), *hooks], [*default_callbacks(), *callbacks]
        resume(group)
        spe = group.steps_per_epoch
        # The table once a command, and not for a finished run run again; summary.txt has it.
        printed = _printed[-1] if _printed else set()
        group.show_summary = group.step < config.epochs * spe and group.summary not in printed
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
                        run.row = row(run, epoch, seconds)
                    for run in group.runs:
                        run.partial = {}
                    group.emit("on_epoch_end", lambda run: (run.row, run.evaluation))
                signum = group.signal  # heard after the last epoch's end: the run is complete
                if signum is not None and group.step < config.epochs * spe:
                    raise Interrupted(
                        signum,
                        f"interrupted ({signal.Signals(signum).name}) at step {group.step}; checkpoint saved in {group.where if len(group.runs) > 1 else group.where / 'checkpoints'}. Resume by running the same command again with --workdir {group.where}",
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
