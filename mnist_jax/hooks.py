"""Hooks: what a run does besides training, attached to the loop from outside (docs/design.md,
"The loop and its hooks").

A hook has some of `Hook`'s methods, written for one run (loop.Run); `loop.train` calls them for
each run of its group, on every process: the built-in hooks (`defaults`) first, then the caller's.
A hook may set run.stop = "epoch" (done after this epoch; the group stops when every run is).
What reports over a group's runs together (printed lines, a signal's stop, a sweep's pruning)
is a group callback: the same methods, called once with the group before the runs' hooks.
"""

import contextlib
import json
import os
import signal
import sys
import time

import jax
import numpy as np

from mnist_jax import checkpoint, diagnostics, metrics, parallel
from mnist_jax.config import ConfigError


class Diverged(Exception):
    """The training loss became NaN or infinite (in member `member` of the group, when known)."""

    def __init__(self, message: str, member: int | None = None):
        super().__init__(message)
        self.member = member


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run saved a checkpoint and stopped."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class Hook:
    """The protocol, doing nothing: subclass it and override what you need."""

    def on_train_start(self, run) -> None: ...  # after set-up and resume, before the first step
    def after_steps(self, run, metrics: dict) -> None: ...  # each host sync: {name: [steps]} since the last
    def on_epoch_end(self, run, row: dict, evaluation: dict) -> None: ...  # evaluation: {"test", "val"?: ...}
    def on_train_end(self, run) -> None: ...  # at the end, or a stop (run.group.error says why)


def call(hooks, method: str, *args) -> None:
    for hook in hooks:
        if hasattr(hook, method):
            getattr(hook, method)(*args)


class Preemption:
    """A group callback: SIGINT and SIGTERM become every run's stop, the same step on every
    process. One process: Python handlers. Several: JAX's preemption sync manager hears SIGTERM
    (a Python handler would take it from it), a Ctrl-C is turned into one, and after each call
    all ask JAX whether they reached the agreed step. A second Ctrl-C stops at once."""

    previous: dict = {}  # the handlers to put back (none if on_train_start never ran)

    def on_train_start(self, group):
        self.multi, self.pressed, self.group, self.asked = jax.process_count() > 1, False, group, group.step
        kinds = (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM)
        self.previous = {s: signal.signal(s, self._handle) for s in kinds}

    def _handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        if self.multi:  # JAX's notifier takes it from here
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            for run in self.group.runs:
                run.stop = signum

    def after_steps(self, group):
        # JAX's sync point is a step id, given once per step in order (Orbax's save gives the
        # step it saves too), so the call's steps go to it one by one.
        steps, self.asked = range(self.asked + 1, group.step + 1), group.step
        if self.multi and group.signal is None and any(parallel.reached_preemption(s) for s in steps):
            for run in group.runs:
                run.stop = signal.SIGTERM

    def on_train_end(self, group):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _naming(run, what: str):
    """An OSError that names no file (a full disk at close, Orbax's metadata save) names the run's `what`."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = f"{run.workdir} ({what})"
        raise


class Checkpoints(Hook):
    """Save the run (asynchronously) at epoch ends, every --checkpoint-every steps and at a stop."""

    def after_steps(self, run, metrics):
        every = run.config.checkpoint_every
        due = every and run.step % every == 0
        if run.group.done < run.group.steps_per_epoch and (due or isinstance(run.stop, int)):
            self.save(run)  # the epoch's end saves below

    def on_epoch_end(self, run, row, evaluation):
        self.save(run)

    def save(self, run):
        with _naming(run, "its checkpoints"):
            run.mngr.wait_until_finished()  # one save in flight a run
            if run.primary:
                checkpoint.mark_committed(run.workdir)
            saved = {"last_epoch": run.row, "partial": {k: v.tolist() for k, v in run.partial.items()} or None}
            checkpoint.save(run.mngr, run.state, saved, run.step, json.loads(run.config.to_json()))

    def on_train_end(self, run):
        if isinstance(run.group.error, Interrupted) and run.mngr.latest_step() != run.step:
            self.save(run)  # the signal came after this run's hooks had run at the stop step
        with _naming(run, "its checkpoints"):
            run.mngr.wait_until_finished()
            if run.primary:
                checkpoint.mark_committed(run.workdir)
            run.mngr.close()


class MetricsFiles(Hook):
    """metrics.jsonl (a row an epoch), train_steps.jsonl (a row per --log-every steps: means,
    metrics.LAST at the row's step) and TensorBoard, on process 0."""

    def __init__(self):
        self.writers = {}

    def on_train_start(self, run):
        with _naming(run, "its metrics files"):
            writer = self.writers[run.index] = metrics.Writer(run.workdir) if run.primary else metrics.NullWriter()
            writer.truncate(run.row, run.step)  # rows after the checkpoint: again

    def after_steps(self, run, new):
        every, spe, done = run.config.log_every, run.group.steps_per_epoch, run.group.done
        for end in [b for b in range(done - len(new["loss"]) + 1, done + 1) if b % every == 0 or b == spe]:
            start = (end - 1) // every * every
            row = {k: float(v[end - 1] if k in metrics.LAST else v[start:end].mean()) for k, v in run.partial.items()}
            with _naming(run, "its metrics files"):
                self.writers[run.index].step({"step": run.step - done + end, **row})

    def on_epoch_end(self, run, row, evaluation):
        with _naming(run, "its metrics files"):
            self.writers[run.index].epoch(row)

    def on_train_end(self, run):
        self.writers[run.index].close()


class ProgressBar:
    """A group callback: a bar an epoch (images/s, running loss, accuracy, learning rate); off
    when the output is not a terminal and on other processes."""

    bar, at = None, 0

    def on_train_start(self, group):
        self.at = group.done

    def after_steps(self, group):
        from tqdm.auto import tqdm

        b, spe = group.runs[0].config.batch_size, group.steps_per_epoch
        if self.bar is None:
            desc = f"epoch {(group.step - 1) // spe + 1}/{group.runs[0].config.epochs}"
            style = dict(unit="img", unit_scale=True, leave=False, disable=None if group.primary else True)
            self.bar = tqdm(total=spe * b, initial=self.at * b, desc=desc, **style)
        self.bar.update((group.done - self.at) * b)
        self.at = group.done
        shown = dict(loss=("loss", ".4f"), accuracy=("acc", ".2%"), learning_rate=("lr", ".3g"))
        last = {k: np.mean([r.partial[k][-1] for r in group.runs]) for k in shown if k in group.runs[0].partial}
        self.bar.set_postfix({shown[k][0]: format(v, shown[k][1]) for k, v in last.items()}, refresh=False)

    def on_epoch_end(self, group):
        self.on_train_end(group)
        self.at = 0

    def on_train_end(self, group):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Printer:
    """A group callback: the lines printed on process 0: the model, the runs, a resume, each
    epoch (several runs: their median), the end."""

    start = 0.0

    def on_train_start(self, group):
        self.start = time.perf_counter()
        if not group.primary:
            return
        if group.show_summary:  # once a command, not for a finished run (loop.train)
            print(group.summary)
        runs, devices, n = group.runs, group.mesh.size, len(group.runs)
        if group.vmap:
            per = f", {n // devices} per device on {devices} devices" if devices > 1 else ""
            which = f"{n} seeds ({runs[0].config.seed}-{runs[-1].config.seed})"
            if not runs[0].label.startswith("seed "):  # a sweep's trials
                which = f"{n} members ({', '.join(r.label for r in runs)})"
            print(f"{which} in one vmapped program{per}")
        elif devices > 1:
            per, platform = runs[0].config.batch_size // devices, group.mesh.devices.flat[0].platform
            print(
                f"Data-parallel over {devices} {platform} devices in {jax.process_count()} process(es): {per} images per device per step"
            )
        spe, epochs = group.steps_per_epoch, runs[0].config.epochs
        if group.step >= epochs * spe:
            print(f"{group.where}: trained to epoch {epochs} already (step {group.step}); nothing left to train")
        elif group.step:
            print(
                f"Resumed {group.where} at step {group.step} (epoch {group.step // spe + 1}, step {group.step % spe} of it)"
            )

    @staticmethod
    def spread(rows, key: str, fmt: str, full: bool = False) -> str:
        """The rows' values: the one, or their median (and range: full)."""
        values = np.asarray([r[key] for r in rows], np.float64)
        if len(values) == 1:
            return format(values[0], fmt)
        extra = f" ({format(values.min(), fmt)} to {format(values.max(), fmt)})" if full else ""
        return f"{format(np.median(values), fmt)} median{extra}"

    def on_epoch_end(self, group):
        if not group.primary:
            return
        spread, rows = self.spread, [r.row for r in group.runs]
        line = f"epoch {rows[0]['epoch']:3d}/{group.runs[0].config.epochs}"
        line += f"  loss {spread(rows, 'train_loss', '.4f')}  acc {spread(rows, 'train_accuracy', '.2%')}"
        for split in ("val", "test"):  # the validation split, when there is one
            if split in group.runs[0].evaluation:
                line += f"  {split}_loss {spread(rows, f'{split}_loss', '.4f')}"
                line += f"  {split}_acc {spread(rows, f'{split}_accuracy', '.2%', full=True)}"
        print(f"{line}  lr {rows[0]['learning_rate']:.3g}  {rows[0]['seconds']:.1f}s", flush=True)

    def on_train_end(self, group):
        if group.primary and group.error is None:
            runs, where = group.runs, f"work directories {group.where}/seed_*"
            if len(runs) == 1:
                where = f"work directory {group.where}"
            elif not runs[0].label.startswith("seed "):  # a sweep's trials
                where = f"work directories {', '.join(str(r.workdir) for r in runs)}"
            print(f"Done in {time.perf_counter() - self.start:.1f}s (compiling {group.compile_s:.1f}s); {where}")


class CollapseWarning(Hook):
    """Warn once (process 0, stderr) if the run's model predicts one class for every image."""

    def __init__(self):
        self.warned = set()

    def on_epoch_end(self, run, row, evaluation):
        label = diagnostics.collapsed_to(evaluation["test"]["predictions"])
        if label is None or run.index in self.warned:
            return
        self.warned.add(run.index)
        dead = diagnostics.dead_counts(evaluation["test"]["alive"])
        if run.primary:
            act = run.config.model.get("activation", "relu")  # conv nets: relu
            warning = diagnostics.collapse_warning(row["epoch"], label, row["test_accuracy"], dead, act)
            print(run.group.label(run.index) + warning, file=sys.stderr)


class Plots(Hook):
    """Draw the run's plots (mnist_jax/plots.py) on process 0 when training has ended."""

    def on_train_end(self, run):
        if run.primary and run.group.error is None:
            from mnist_jax import plots  # matplotlib only when drawing

            plots.draw_all(run.workdir, run.config.data.dir or None)
            print(f"Plots in {run.workdir / 'plots'}")


class LiveCurves(Hook):
    """The curves as training goes, on process 0: plots/schedule.png before the first step,
    plots/curves.png redrawn at each epoch's end and, inline=True (a notebook), at each host
    sync too, shown in the cell (the first run's). A redraw (about 0.2 s) waits until training
    ran 1/budget times the last one's cost (budget=None: no wait); the first and the last
    epoch's are always drawn. `draws` and `spent` (seconds) say what it did."""

    def __init__(self, inline: bool = False, budget: float | None = 0.05):
        self.inline, self.budget = inline, budget
        self.draws, self.spent, self.cost, self.last, self.shown = 0, 0.0, 0.0, 0.0, {}

    def _show(self, key: str, path) -> None:
        from IPython.display import Image, display

        if key in self.shown:
            self.shown[key].update(Image(filename=str(path)))
        else:
            self.shown[key] = display(Image(filename=str(path)), display_id=True)

    def on_train_start(self, run):
        if not run.primary:
            return
        from mnist_jax import plots  # matplotlib only when drawing

        path = run.workdir / "plots" / "schedule.png"
        path.parent.mkdir(exist_ok=True)
        plots.schedule(run.config, run.group.steps_per_epoch, path)
        if self.inline and run.index == 0:
            self._show("schedule", path)
        self.last = time.perf_counter()

    def _draw(self, run, force: bool = False) -> None:
        now = time.perf_counter()
        if not run.primary or not (force or self.budget is None or (now - self.last) * self.budget >= self.cost):
            return
        from mnist_jax import plots

        path = run.workdir / "plots" / "curves.png"
        plots.curves(run.workdir, path, run.group.steps_per_epoch)
        if self.inline and run.index == 0:
            self._show("curves", path)
        self.last = time.perf_counter()
        self.cost = self.last - now
        self.draws, self.spent = self.draws + 1, self.spent + self.cost

    def after_steps(self, run, metrics):
        if self.inline and run.group.done < run.group.steps_per_epoch:  # the epoch's end draws below
            self._draw(run)

    def on_epoch_end(self, run, row, evaluation):
        self._draw(run, force=row["epoch"] == run.config.epochs)


class StopAt(Hook):
    """Stop the run after the epoch where its validation accuracy reaches `target`: a choice,
    made on the validation split, never on the test set."""

    def __init__(self, target: float):
        self.target = target

    def on_train_start(self, run):
        if "val" not in run.group.arrays:
            raise ConfigError("a stop at a target accuracy chooses on a validation split: set --data-val-split N")

    def on_epoch_end(self, run, row, evaluation):
        if evaluation["val"]["accuracy"] >= self.target:
            run.stop = run.stop or "epoch"


def defaults(save: bool = True) -> list:
    """The built-in hooks of each run, in order (the stage command adds the plots)."""
    return [*([Checkpoints()] if save else []), MetricsFiles(), CollapseWarning()]


def callbacks() -> list:
    """The built-in group callbacks: the stop first, so that the runs' checkpoints follow it."""
    return [Preemption(), ProgressBar(), Printer()]
