"""Hooks: what a run does besides training, attached to the loop from outside.

A hook is any object with some of these methods (`Hook` has them all, doing nothing), written
for one run (loop.Run); `loop.train` calls them for each run of its group, on every process, in
the order of the list: the built-in hooks of `defaults` first, then the caller's.

  on_train_start(run)          after set-up and resume, before the first step
  after_steps(run, metrics)    at each host sync, with the run's step metrics {name: [steps]}
                               trained since the last one. Host syncs come at every compiled
                               call's end that passes a --log-every step, a checkpoint step or
                               the epoch's end: with one step a call (the CPU's default) every
                               --log-every steps; with the whole epoch a call (GPU/TPU) once an
                               epoch
  on_epoch_end(run, row, evaluation)
                               row: the run's metrics row of the epoch (a flat dict of scalars,
                               written to metrics.jsonl by MetricsFiles); evaluation: {"test",
                               and "val" with --data-val-split: metrics, predictions and units
                               alive}
  on_train_end(run)            when training ends, or stops (run.group.error says why: a
                               signal, a NaN, an exception)

`run` holds its config, work directory, state (run.state), step, the unfinished epoch's step
metrics (run.partial) and its last row; a hook may set run.stop = "epoch" (this run is done
after this epoch; its group stops when every run is). What reports over the runs of a group
together (the printed lines, a signal's stop, a sweep's pruning) is a group callback: the same
methods, called once with the group (loop.Group: .runs), before the runs' hooks (`callbacks`).
"""

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

    def on_train_start(self, run) -> None:
        pass

    def after_steps(self, run, metrics: dict) -> None:
        pass

    def on_epoch_end(self, run, row: dict, evaluation: dict) -> None:
        pass

    def on_train_end(self, run) -> None:
        pass


def call(hooks, method: str, *args) -> None:
    for hook in hooks:
        if hasattr(hook, method):
            getattr(hook, method)(*args)


class Preemption:
    """A group callback: SIGINT and SIGTERM, turned into a stop that every process takes at the
    same call's end.

    One process: Python handlers set each run's stop, which also ends a compiled call early.
    Several: JAX's preemption sync manager hears SIGTERM itself (a Python handler would take the
    signal from it), a Ctrl-C becomes a SIGTERM to this process, and after each call every
    process asks JAX whether all have reached the agreed step, so they save one checkpoint
    together and exit alike. A second Ctrl-C stops at once.
    """

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


def _named(what: str):
    """A hook method whose OSError names `what` it writes ("{where}": the work directory) when
    it names no file: a write cut short by a full disk raises at close with none, and so does
    Orbax's save of a checkpoint's metadata."""

    def wrap(method):
        def named(self, run, *args):
            try:
                return method(self, run, *args)
            except OSError as e:
                if e.filename is None:
                    e.filename = what.format(where=run.workdir)
                raise

        return named

    return wrap


class Checkpoints(Hook):
    """Save the run (asynchronously) at epoch ends, every --checkpoint-every steps and at a
    stop; at the end, wait for the saves and mark the work directory committed."""

    @_named("{where} (its checkpoints)")
    def after_steps(self, run, metrics):
        every = run.config.checkpoint_every
        due = every and run.step % every == 0
        if run.group.done < run.group.steps_per_epoch and (due or isinstance(run.stop, int)):
            self.save(run)  # the epoch's end saves below

    @_named("{where} (its checkpoints)")
    def on_epoch_end(self, run, row, evaluation):
        self.save(run)

    def save(self, run):
        run.mngr.wait_until_finished()  # one save in flight a run
        if run.primary:
            checkpoint.mark_committed(run.workdir)
        saved = {"last_epoch": run.row, "partial": {k: v.tolist() for k, v in run.partial.items()} or None}
        checkpoint.save(run.mngr, run.state, saved, run.step, json.loads(run.config.to_json()))

    @_named("{where} (its checkpoints)")
    def on_train_end(self, run):
        if isinstance(run.group.error, Interrupted) and run.mngr.latest_step() != run.step:
            self.save(run)  # the signal came after this run's hooks had run at the stop step
        run.mngr.wait_until_finished()
        if run.primary:
            checkpoint.mark_committed(run.workdir)
        run.mngr.close()


class MetricsFiles(Hook):
    """metrics.jsonl (a row per epoch), train_steps.jsonl (a row per --log-every steps: each
    metric's mean over them, metrics.LAST at the row's step) and TensorBoard, on process 0."""

    def __init__(self):
        self.writers = {}

    @_named("{where} (its metrics files)")
    def on_train_start(self, run):
        writer = self.writers[run.index] = metrics.Writer(run.workdir) if run.primary else metrics.NullWriter()
        writer.truncate(run.row, run.step)  # rows after the checkpoint: again

    @_named("{where} (its metrics files)")
    def after_steps(self, run, new):
        every, spe, done = run.config.log_every, run.group.steps_per_epoch, run.group.done
        first = done - len(new["loss"])
        for end in [b for b in range(first + 1, done + 1) if b % every == 0 or b == spe]:
            start = (end - 1) // every * every
            row = {"step": run.step - done + end}
            row.update(
                {k: float(v[end - 1] if k in metrics.LAST else v[start:end].mean()) for k, v in run.partial.items()}
            )
            self.writers[run.index].step(row)

    @_named("{where} (its metrics files)")
    def on_epoch_end(self, run, row, evaluation):
        self.writers[run.index].epoch(row)

    def on_train_end(self, run):
        self.writers[run.index].close()


class ProgressBar:
    """A group callback: a bar per epoch, images/s, the running loss and accuracy, the learning
    rate. Off when the output is not a terminal (CI logs keep a line per epoch) and on other
    processes."""

    bar, at = None, 0

    def on_train_start(self, group):
        self.at = group.done

    def after_steps(self, group):
        from tqdm.auto import tqdm

        b, spe = group.runs[0].config.batch_size, group.steps_per_epoch
        if self.bar is None:
            self.bar = tqdm(
                total=spe * b,
                initial=self.at * b,
                unit="img",
                unit_scale=True,
                desc=f"epoch {(group.step - 1) // spe + 1}/{group.runs[0].config.epochs}",
                leave=False,
                disable=None if group.primary else True,
            )
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
    """A group callback: the lines a group prints on process 0: the model, the runs, a resume,
    each epoch (loss, accuracy and learning rate, which train_step reports; several runs:
    their median), the end."""

    start = 0.0

    def on_train_start(self, group):
        self.start = time.perf_counter()
        if not group.primary:
            return
        if group.show_summary:  # once a command, not for a finished run (loop.train)
            print(group.summary)
        for line in group.describe():
            print(line)
        spe, epochs = group.steps_per_epoch, group.runs[0].config.epochs
        if group.step >= epochs * spe:
            print(f"{group.where}: trained to epoch {epochs} already (step {group.step}); nothing left to train")
        elif group.step:
            print(
                f"Resumed {group.where} at step {group.step} (epoch {group.step // spe + 1}, step {group.step % spe} of it)"
            )

    def on_epoch_end(self, group):
        if not group.primary:
            return
        spread, rows = group.spread, [r.row for r in group.runs]
        line = f"epoch {rows[0]['epoch']:3d}/{group.runs[0].config.epochs}"
        line += f"  loss {spread([r['train_loss'] for r in rows], '.4f')}"
        line += f"  acc {spread([r['train_accuracy'] for r in rows], '.2%')}"
        for split in ("val", "test"):  # the validation split, when there is one
            if split in group.runs[0].evaluation:
                line += f"  {split}_loss {spread([r[f'{split}_loss'] for r in rows], '.4f')}"
                line += f"  {split}_acc {spread([r[f'{split}_accuracy'] for r in rows], '.2%', full=True)}"
        print(f"{line}  lr {rows[0]['learning_rate']:.3g}  {rows[0]['seconds']:.1f}s", flush=True)

    def on_train_end(self, group):
        if group.primary and group.error is None:
            print(
                f"Done in {time.perf_counter() - self.start:.1f}s (compiling {group.compile_s:.1f}s); {group.where_all}"
            )


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
    """The curves as training goes, on process 0: plots/schedule.png (the learning-rate
    schedule, from the schedule itself) before the first step, then plots/curves.png redrawn
    from the run's files at each epoch's end (an image viewer shows progress) and, inline=True
    (a notebook), at each host sync too, shown in the cell's output (the first run's).

    A redraw takes about 0.2 s here, a dense stage's epoch about a second: a redraw waits until
    training has run 1/budget times the last one's duration since it (budget=None: no wait),
    so drawing takes at most `budget` of the time; the first redraw (which measures the cost)
    and the last epoch's are always drawn. `draws` and `spent` (seconds) say what it did."""

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
    """Stop the run after the epoch where its validation accuracy reaches `target` (its group,
    when every run has): a stop is a choice, made on the validation split (--data-val-split),
    never on the test set."""

    def __init__(self, target: float):
        self.target = target

    def on_train_start(self, run):
        if "val" not in run.group.arrays:
            raise ConfigError("a stop at a target accuracy chooses on a validation split: set --data-val-split N")

    def on_epoch_end(self, run, row, evaluation):
        if evaluation["val"]["accuracy"] >= self.target:
            run.stop = run.stop or "epoch"


def defaults(save: bool = True) -> list:
    """The built-in hooks of each run, in the order they run. Plots are the stage command's to
    add (--plots)."""
    return [*([Checkpoints()] if save else []), MetricsFiles(), CollapseWarning()]


def callbacks() -> list:
    """The built-in group callbacks: the stop first, so that the runs' checkpoints follow it."""
    return [Preemption(), ProgressBar(), Printer()]
