"""Hooks: what a run does besides training, attached to the loop from outside.

A hook is any object with some of these methods (`Hook` has them all, doing nothing).
`loop.train` calls each hook's method on every process, in the order of the list: the
built-in hooks of `defaults` first, then the caller's.

  on_train_start(run)          after set-up and resume, before the first step
  after_steps(run, metrics)    at each host sync, with the step metrics {name: [members, steps]}
                               trained since the last one. Host syncs come at every compiled
                               call's end that passes a --log-every step, a checkpoint step or
                               the epoch's end: with one step a call (the CPU's default) every
                               --log-every steps; with the whole epoch a call (GPU/TPU) once an
                               epoch
  on_epoch_end(run, rows, evaluation)
                               rows: each member's metrics row of the epoch (a flat dict of
                               scalars, written to metrics.jsonl by MetricsFiles); evaluation:
                               {"test", and "val" with --data-val-split: metrics, predictions
                               and units alive, each [members, ...]}
  on_train_end(run)            when training ends, or stops (run.error says why: a signal, a
                               NaN, an exception)

`run` (loop.Run) holds the config, the members (run.members.take(run.state, i) is member i's
state), the step, the unfinished epoch's step metrics and the last rows; a hook may set
run.stop (a signal: checkpoint and stop now) or run.finished (stop after this epoch).
"""

import os
import shutil
import signal
import sys
import time

import jax
import numpy as np

from mnist_jax import checkpoint, diagnostics, metrics, parallel
from mnist_jax.config import ConfigError


class Hook:
    """The protocol, doing nothing: subclass it and override what you need."""

    def on_train_start(self, run) -> None:
        pass

    def after_steps(self, run, metrics: dict) -> None:
        pass

    def on_epoch_end(self, run, rows: list[dict], evaluation: dict) -> None:
        pass

    def on_train_end(self, run) -> None:
        pass


def call(hooks, method: str, *args) -> None:
    for hook in hooks:
        if hasattr(hook, method):
            getattr(hook, method)(*args)


class Preemption(Hook):
    """SIGINT and SIGTERM, turned into a stop that every process takes at the same call's end.

    One process: Python handlers set run.interrupt, which also ends a compiled call early.
    Several: JAX's preemption sync manager hears SIGTERM itself (a Python handler would take the
    signal from it), a Ctrl-C becomes a SIGTERM to this process, and after each call every
    process asks JAX whether all have reached the agreed step, so they save one checkpoint
    together and exit alike. A second Ctrl-C stops at once.
    """

    previous: dict = {}  # the handlers to put back (none if on_train_start never ran)

    def on_train_start(self, run):
        self.multi, self.pressed, self.run = jax.process_count() > 1, False, run
        kinds = (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM)
        self.previous = {s: signal.signal(s, self._handle) for s in kinds}

    def _handle(self, signum, frame):
        if self.run.interrupt is not None or self.pressed:
            raise KeyboardInterrupt
        if self.multi:  # JAX's notifier takes it from here
            self.pressed = True
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.run.interrupt = signum

    def after_steps(self, run, metrics):
        # JAX's sync point is a step id, given once per step in order (Orbax's save gives the
        # step it saves too), so the call's steps go to it one by one.
        if run.stop is None and not self.multi:
            run.stop = run.interrupt
        elif run.stop is None:
            steps = range(run.step - len(metrics["loss"][0]) + 1, run.step + 1)
            if any(parallel.reached_preemption(s) for s in steps):
                run.stop = signal.SIGTERM

    def on_train_end(self, run):
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
                    e.filename = what.format(where=run.members.where)
                raise

        return named

    return wrap


class Checkpoints(Hook):
    """Save every member (asynchronously) at epoch ends, every --checkpoint-every steps and at a
    stop; at the end, wait for the saves and mark the work directory committed."""

    @_named("{where} (its checkpoints)")
    def after_steps(self, run, metrics):
        every = run.config.checkpoint_every
        due = every and run.step % every == 0
        if run.done < run.steps_per_epoch and (due or run.stop):  # the epoch's end saves below
            self.save(run)

    @_named("{where} (its checkpoints)")
    def on_epoch_end(self, run, rows, evaluation):
        self.save(run)

    def save(self, run):
        for i, mngr in enumerate(run.mngrs):
            mngr.wait_until_finished()  # one save in flight a member
            if run.primary:
                checkpoint.mark_committed(run.members.workdirs[i])
            partial = {k: v[i].tolist() for k, v in run.partial.items()} or None
            saved = {"last_epoch": run.rows[i], "partial": partial}
            checkpoint.save(mngr, run.members.take(run.state, i), saved, run.step, run.recorded[i])

    @_named("{where} (its checkpoints)")
    def on_train_end(self, run):
        for workdir, mngr in zip(run.members.workdirs, run.mngrs):
            mngr.wait_until_finished()
            if run.primary:
                checkpoint.mark_committed(workdir)
            mngr.close()


class MetricsFiles(Hook):
    """metrics.jsonl (a row per epoch), train_steps.jsonl (a row per --log-every steps: each
    metric's mean over them, metrics.LAST at the row's step) and TensorBoard, on process 0."""

    writers: list = []

    @_named("{where} (its metrics files)")
    def on_train_start(self, run):
        self.writers = [metrics.Writer(w) if run.primary else metrics.NullWriter() for w in run.members.workdirs]
        for writer, row in zip(self.writers, run.rows):  # rows after the checkpoint: again
            writer.truncate(row, run.step)

    @_named("{where} (its metrics files)")
    def after_steps(self, run, new):
        every, spe, done = run.config.log_every, run.steps_per_epoch, run.done
        first = done - len(next(iter(new.values()))[0])
        for end in [b for b in range(first + 1, done + 1) if b % every == 0 or b == spe]:
            start = (end - 1) // every * every
            for i, writer in enumerate(self.writers):
                row = {"step": run.step - done + end}
                row.update(
                    {
                        k: float(v[i, end - 1] if k in metrics.LAST else v[i, start:end].mean())
                        for k, v in run.partial.items()
                    }
                )
                writer.step(row)

    @_named("{where} (its metrics files)")
    def on_epoch_end(self, run, rows, evaluation):
        for writer, row in zip(self.writers, rows):
            writer.epoch(row)

    def on_train_end(self, run):
        for writer in self.writers:
            writer.close()


class ProgressBar(Hook):
    """A bar per epoch: images/s, the running loss and accuracy, the learning rate. Off when
    the output is not a terminal (CI logs keep a line per epoch) and on other processes."""

    bar = None

    def after_steps(self, run, new):
        from tqdm.auto import tqdm

        b, spe, steps = run.config.batch_size, run.steps_per_epoch, len(new["loss"][0])
        if self.bar is None:
            self.bar = tqdm(
                total=spe * b,
                initial=(run.done - steps) * b,
                unit="img",
                unit_scale=True,
                desc=f"epoch {(run.step - 1) // spe + 1}/{run.config.epochs}",
                leave=False,
                disable=None if run.primary else True,
            )
        self.bar.update(steps * b)
        shown = dict(loss=("loss", ".4f"), accuracy=("acc", ".2%"), learning_rate=("lr", ".3g"))
        figures = {name: format(run.partial[k][:, -1].mean(), f) for k, (name, f) in shown.items() if k in run.partial}
        self.bar.set_postfix(figures, refresh=False)

    def on_epoch_end(self, run, rows, evaluation):
        self.on_train_end(run)

    def on_train_end(self, run):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Printer(Hook):
    """The lines a run prints on process 0: the model, the members, a resume, each epoch (loss,
    accuracy and learning rate, which train_step reports), the end."""

    start = 0.0

    def on_train_start(self, run):
        self.start = time.perf_counter()
        if not run.primary:
            return
        if run.show_summary:  # once a command, not for a finished run (loop.train)
            print(run.summary)
        for line in run.members.describe():
            print(line)
        spe = run.steps_per_epoch
        if run.step >= run.config.epochs * spe:
            print(
                f"{run.members.where}: trained to epoch {run.config.epochs} already (step {run.step}); nothing left to train"
            )
        elif run.step:
            print(
                f"Resumed {run.members.where} at step {run.step} (epoch {run.step // spe + 1}, step {run.step % spe} of it)"
            )

    def on_epoch_end(self, run, rows, evaluation):
        if run.primary:
            spread, r = run.members.spread, rows[0]
            line = f"epoch {r['epoch']:3d}/{run.config.epochs}"
            line += f"  loss {spread([r['train_loss'] for r in rows], '.4f')}"
            line += f"  acc {spread([r['train_accuracy'] for r in rows], '.2%')}"
            for split in ("val", "test"):  # the validation split, when there is one
                if split in evaluation:
                    ev = evaluation[split]
                    line += f"  {split}_loss {spread(ev['loss'], '.4f')}"
                    line += f"  {split}_acc {spread(ev['accuracy'], '.2%', full=True)}"
            print(f"{line}  lr {r['learning_rate']:.3g}  {r['seconds']:.1f}s", flush=True)

    def on_train_end(self, run):
        if run.primary and run.error is None:
            print(
                f"Done in {time.perf_counter() - self.start:.1f}s (compiling {run.members.compile_s:.1f}s); {run.members.where_all}"
            )


class CollapseWarning(Hook):
    """Warn once a member (process 0, stderr) if its model predicts one class for every image."""

    def on_train_start(self, run):
        self.warned = set()

    def on_epoch_end(self, run, rows, evaluation):
        test = evaluation["test"]
        for i, row in enumerate(rows):
            label = diagnostics.collapsed_to(test["predictions"][i])
            if label is None or i in self.warned:
                continue
            self.warned.add(i)
            dead = diagnostics.dead_counts({k: v[i] for k, v in test["alive"].items()})
            if run.primary:
                act = run.config.model.get("activation", "relu")  # conv nets: relu
                warning = diagnostics.collapse_warning(row["epoch"], label, row["test_accuracy"], dead, act)
                print(run.members.label(i) + warning, file=sys.stderr)


class Plots(Hook):
    """Draw each member's plots (mnist_jax/plots.py) on process 0 when training has ended."""

    def on_train_end(self, run):
        if run.primary and run.error is None:
            from mnist_jax import plots  # matplotlib only when drawing

            for workdir in run.members.workdirs:
                plots.draw_all(workdir, run.config.data.dir or None)
                print(f"Plots in {workdir / 'plots'}")


class LiveCurves(Hook):
    """The curves as training goes, on process 0: each member's plots/schedule.png (the
    learning-rate schedule, from the schedule itself) before the first step, then
    plots/curves.png redrawn from the run's files at each epoch's end (an image viewer shows
    progress) and, inline=True (a notebook), at each host sync too, shown in the cell's output.

    A redraw takes about 0.2 s here, a dense stage's epoch about a second: a redraw waits until
    training has run 1/budget times the last one's duration since it (budget=None: no wait),
    so drawing takes at most `budget` of the time; the first redraw (which measures the cost)
    and the last epoch's are always drawn. `draws` and
    `spent` (seconds) say what it did."""

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

        first, *others = [w / "plots" / "schedule.png" for w in run.members.workdirs]
        for path in (first, *others):
            path.parent.mkdir(exist_ok=True)
        plots.schedule(run.config, run.steps_per_epoch, first)  # the members share it
        for path in others:
            shutil.copyfile(first, path)
        if self.inline:
            self._show("schedule", run.members.workdirs[0] / "plots" / "schedule.png")
        self.last = time.perf_counter()

    def _draw(self, run, force: bool = False) -> None:
        now = time.perf_counter()
        if not run.primary or not (force or self.budget is None or (now - self.last) * self.budget >= self.cost):
            return
        from mnist_jax import plots

        for workdir in run.members.workdirs:
            plots.curves(workdir, workdir / "plots" / "curves.png", run.steps_per_epoch)
        if self.inline:
            self._show("curves", run.members.workdirs[0] / "plots" / "curves.png")
        self.last = time.perf_counter()
        self.cost = self.last - now
        self.draws, self.spent = self.draws + 1, self.spent + self.cost

    def after_steps(self, run, metrics):
        if self.inline and run.done < run.steps_per_epoch:  # the epoch's end draws below
            self._draw(run)

    def on_epoch_end(self, run, rows, evaluation):
        self._draw(run, force=rows[0]["epoch"] == run.config.epochs)


class StopAt(Hook):
    """Stop after the epoch where every member's validation accuracy reaches `target`: a stop
    is a choice, made on the validation split (--data-val-split), never on the test set."""

    def __init__(self, target: float):
        self.target = target

    def on_train_start(self, run):
        if "val" not in run.arrays:
            raise ConfigError("a stop at a target accuracy chooses on a validation split: set --data-val-split N")

    def on_epoch_end(self, run, rows, evaluation):
        run.finished = bool(np.all(evaluation["val"]["accuracy"] >= self.target))


def defaults(save: bool = True) -> list:
    """The built-in hooks, in the order they run: the stop first, so that a checkpoint follows
    it. Plots are the stage command's to add (--plots)."""
    checkpoints = [Checkpoints()] if save else []
    return [Preemption(), *checkpoints, MetricsFiles(), ProgressBar(), Printer(), CollapseWarning()]
