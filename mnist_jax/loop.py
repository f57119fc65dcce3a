"""The training loop: epochs of jitted steps, evaluation, logging, checkpoints and resume.

A run is a function of (config, seed): the data order of an epoch comes from (seed, epoch), the
dropout key of a step from (seed, step). A checkpoint stores the model, the optimizer and the
per-step metrics of the unfinished epoch, so a run resumed from any checkpoint, mid-epoch
included, ends bit for bit as the uninterrupted run (tests/test_resume.py kills runs to check).

`train_and_evaluate` is the whole loop: `runs.setup` and `runs.resume`, then per epoch
`train_epoch` and `end_epoch`. An epoch runs in chunks of steps that end where host work is due
(a log row, a checkpoint, the epoch's end); at a chunk's end the host fetches its metrics, checks
them for NaN, logs, saves and reads signals. `run_steps` trains one chunk: one jitted call per
step today; a compiled lax.scan over the chunk (and a vmap over seeds) would replace it alone.
"""

import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_jax import data, diagnostics, parallel, runs, train
from mnist_jax.runs import Progress, Run, step_count


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run saved a checkpoint and stopped."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class _Signals:
    """SIGINT and SIGTERM, turned into a stop that every process takes at the same chunk's end.

    One process: Python handlers set `received`, which also ends a chunk early. Several: JAX's
    preemption sync manager hears SIGTERM itself (a Python handler would take the signal from
    it), a Ctrl-C becomes a SIGTERM to this process, and `stop` asks JAX whether all processes
    have reached the agreed step, so they save one checkpoint together and exit alike.
    """

    def __init__(self, processes: int):
        self.multi = processes > 1
        self.received = None  # one process: the signal to stop at; several: never set
        self.pressed = False  # several processes: Ctrl-C seen once
        self.stopping = None

    def __enter__(self):
        kinds = (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM)
        self.previous = {s: signal.signal(s, self._handle) for s in kinds}
        return self

    def _handle(self, signum, frame):
        if self.received is not None or self.pressed:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if self.multi:  # JAX's notifier takes it from here
            self.pressed = True
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.received = signum

    def stop(self, steps: range) -> int | None:
        """At the end of a chunk that trained `steps`: the signal to stop for, or None.

        Several processes: JAX's sync point is a step id, given once per step in order (Orbax's
        save gives the step it saves too), so the chunk's steps go to it one by one; all
        processes stop at the end of the same chunk.
        """
        if self.stopping is None:
            if not self.multi:
                self.stopping = self.received
            elif any(parallel.reached_preemption(s) for s in steps):
                self.stopping = signal.SIGTERM
        return self.stopping

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def chunk_end(config: ml_collections.ConfigDict, done: int, step: int, steps_per_epoch: int):
    """The step of the epoch after which host work is next due: log row, checkpoint or its end."""
    ends = [steps_per_epoch, (done // config.log_every + 1) * config.log_every]
    if config.checkpoint_every:
        ends.append(done + config.checkpoint_every - step % config.checkpoint_every)
    return min(ends)


def run_steps(run: Run, state, idx: np.ndarray, signals: _Signals, epoch: int, step: int):
    """Train on the batches idx [K, batch] from global step `step`: (state, metrics [<= K]).

    One jitted call per step (XLA:CPU runs convolutions in a lax.scan body slowly, see
    train.train_batch); a signal ends the chunk early. Metrics stay on the device.
    """
    out = []
    for i in idx:
        try:
            state, m = train.train_batch(
                state,
                run.train_x,
                run.train_y,
                i,
                run.dropout_rng,
                sharding=run.sharding,
                shift=run.config.data.augment_shift,
            )
        except FloatingPointError as e:  # raised under --debug-nans
            raise Diverged(
                f"{e} at epoch {epoch + 1}, step {step + len(out) + 1}; "
                f"last good checkpoint: step {run.mngr.latest_step()}"
            ) from None
        out.append(m)
        if signals.received:
            break
    return state, jax.tree.map(lambda *x: jnp.stack(x), *out)


def fetch(run: Run, partial: dict, chunk: dict, epoch: int) -> dict:
    """`partial` extended by a chunk's step metrics, brought to the host; stop on NaN or inf."""
    w = parallel.to_host(chunk)
    bad = np.flatnonzero(~np.isfinite(w["loss"]))
    if len(bad):
        step = epoch * run.steps_per_epoch + len(partial["loss"]) + int(bad[0]) + 1
        kept = run.mngr.latest_step()
        raise Diverged(
            f"training loss became {w['loss'][bad[0]]} at epoch {epoch + 1}, step {step} "
            f"(lr {w['learning_rate'][bad[0]]:.3g}); "
            + (f"last good checkpoint: step {kept}" if kept is not None else "no checkpoint kept")
            + "; try a smaller --opt-lr, or --debug-nans to find the operation"
        )
    return {k: np.concatenate([partial[k], w[k]]) for k in runs.STEP_KEYS}


def log_steps(run: Run, partial: dict, step: int, bar) -> None:
    """A train_steps.jsonl row (the mean of the steps since the previous one) and the bar's."""
    done = len(partial["loss"])
    start = (done - 1) // run.config.log_every * run.config.log_every
    row = {"step": step}
    row.update({k: float(partial[k][start:done].mean()) for k in ("loss", "accuracy")})
    row["learning_rate"] = float(partial["learning_rate"][done - 1])
    run.writer.step(row)
    bar.set_postfix(
        loss=f"{partial['loss'][-1]:.4f}",
        acc=f"{partial['accuracy'][-1]:.2%}",
        lr=f"{partial['learning_rate'][-1]:.3g}",
        refresh=False,
    )


def train_epoch(run: Run, progress: Progress, epoch: int, signals: _Signals, bar) -> Progress:
    """The epoch's steps (its rest, after a resume); stops early, checkpointed, at a signal."""
    config, spe = run.config, run.steps_per_epoch
    idx = np.asarray(data.epoch_batches(run.data_rng, epoch, len(run.train_x), config.batch_size))
    done = len(progress.partial["loss"])
    while done < spe:
        step = epoch * spe + done
        end = chunk_end(config, done, step, spe)
        state, chunk = run_steps(run, progress.state, idx[done:end], signals, epoch, step)
        progress = progress._replace(
            state=state, partial=fetch(run, progress.partial, chunk, epoch)
        )
        n = len(progress.partial["loss"]) - done
        done, step = done + n, step + n
        bar.update(n * config.batch_size)
        if done % config.log_every == 0 or done == spe:
            log_steps(run, progress.partial, step, bar)
        due = config.checkpoint_every and step % config.checkpoint_every == 0
        stop = signals.stop(range(step - n + 1, step + 1))
        if done < spe and (due or stop):
            runs.save(run, progress)  # at the epoch's end, end_epoch saves
        if stop:
            break
    return progress


def end_epoch(run: Run, progress: Progress, epoch: int, t0: float) -> tuple[Progress, np.ndarray]:
    """Evaluate, checkpoint, log and print the finished epoch; also its test predictions."""
    state, p = progress.state, progress.partial
    ev = parallel.to_host(train.eval_dataset(state, run.test_x, run.test_y, sharding=run.sharding))
    row = {
        "epoch": epoch + 1,
        "step": step_count(state),
        "train_loss": float(p["loss"].mean()),
        "train_accuracy": float(p["accuracy"].mean()),
        "val_loss": float(ev["loss"]),
        "val_accuracy": float(ev["accuracy"]),
        "learning_rate": float(p["learning_rate"][-1]),
        "seconds": time.perf_counter() - t0,
    }
    progress = Progress(state, runs.no_steps(), row)
    runs.save(run, progress)
    run.writer.epoch(row)
    if run.primary:
        print(
            f"epoch {row['epoch']:3d}/{run.config.epochs}  loss {row['train_loss']:.4f}"
            f"  acc {row['train_accuracy']:.2%}  val_loss {row['val_loss']:.4f}"
            f"  val_acc {row['val_accuracy']:.2%}  lr {row['learning_rate']:.3g}"
            f"  {row['seconds']:.1f}s",
            flush=True,
        )
    return progress, ev["predictions"]


def warn_if_collapsed(run: Run, progress: Progress, predictions: np.ndarray) -> bool:
    """Warn (process 0, stderr) if the model predicts one class for every test image."""
    label = diagnostics.collapsed_to(predictions)
    if label is None:
        return False
    # Every process: dead_units runs a jitted program over the (global) test arrays.
    dead = diagnostics.dead_units(progress.state, run.test_x)
    if run.primary:
        row = progress.last_epoch
        warning = diagnostics.collapse_warning(row["epoch"], label, row["val_accuracy"], dead)
        print(warning, file=sys.stderr)
    return True


def _bar(run: Run, epoch: int, done: int):
    from tqdm.auto import tqdm

    batch = run.config.batch_size
    return tqdm(
        total=run.steps_per_epoch * batch,
        initial=done * batch,
        unit="img",
        unit_scale=True,
        desc=f"epoch {epoch + 1}/{run.config.epochs}",
        leave=False,
        disable=None if run.primary else True,  # None: no bar when not on a terminal (CI logs)
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> train.TrainState:
    """Train `config.epochs` epochs, evaluating on the test set after each; resume if possible.

    Writes to WORKDIR: config.json, summary.txt, metrics.jsonl (a line per epoch),
    train_steps.jsonl and tensorboard/ (sampled during training) and checkpoints/.
    """
    jax.config.update("jax_debug_nans", bool(config.debug_nans))
    parallel.initialize(config.distributed)
    run, state = runs.setup(config, Path(workdir))
    progress = runs.resume(run, state)
    start, warned = time.perf_counter(), False
    with _Signals(jax.process_count()) as signals:
        try:
            for epoch in range(step_count(progress.state) // run.steps_per_epoch, config.epochs):
                t0 = time.perf_counter()
                with _bar(run, epoch, len(progress.partial["loss"])) as bar:
                    progress = train_epoch(run, progress, epoch, signals, bar)
                if len(progress.partial["loss"]) == run.steps_per_epoch:  # the epoch finished
                    progress, predictions = end_epoch(run, progress, epoch, t0)
                    warned = warned or warn_if_collapsed(run, progress, predictions)
                if signals.stopping:
                    raise Interrupted(
                        signals.stopping,
                        f"interrupted ({signal.Signals(signals.stopping).name}) at step "
                        f"{step_count(progress.state)}; checkpoint saved in "
                        f"{run.workdir / 'checkpoints'}. Resume by running the same command "
                        f"again with --workdir {run.workdir}",
                    )
        except jax.errors.JaxRuntimeError:
            if jax.process_count() > 1:
                raise  # another process is gone: no collective (close's included) can complete
            runs.close(run)
            raise
        except BaseException:
            runs.close(run)
            raise
    runs.close(run)
    if run.primary:
        print(f"Done in {time.perf_counter() - start:.1f}s; work directory {run.workdir}")
    return progress.state
