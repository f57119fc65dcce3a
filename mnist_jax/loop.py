"""The training loop: epochs of jitted steps, evaluation, logging, checkpoints and resume.

A run is a function of (config, seed): the data order of an epoch comes from (seed, epoch), the
dropout key of a step from (seed, step). A checkpoint stores the model, the optimizer and the
per-step metrics of the unfinished epoch, so a run resumed from any checkpoint, mid-epoch
included, ends bit for bit as the uninterrupted run (tests/test_resume.py kills runs to check).
"""

import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_jax import checkpoint, data, diagnostics, metrics, models, parallel, train
from mnist_jax.config import ConfigError, validate

STEP_KEYS = ("loss", "accuracy", "learning_rate")


class Diverged(Exception):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: the run saved a checkpoint and stopped."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class _Signals:
    """Turn SIGINT / SIGTERM into a flag the loop reads between steps."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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


class Run:
    """One training run in a work directory; `Run(config, workdir).train()`."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        validate(config)
        self.config, self.workdir = config, Path(workdir)
        self.mesh = parallel.make_mesh(config.devices)
        parallel.check_batch(config.batch_size, self.mesh)
        # None on one device: the single-device program, untouched.
        self.sharding = parallel.batch_sharding(self.mesh) if self.mesh.size > 1 else None
        self.primary = parallel.is_primary()
        arrays = split_data(data.load(config.data.dir or None), config)
        if self.primary:
            checkpoint.prepare_workdir(self.workdir, config)
        parallel.sync("workdir ready")
        self.steps_per_epoch = len(arrays[0]) // config.batch_size
        init_rng, self.data_rng, self.dropout_rng = jax.random.split(
            jax.random.PRNGKey(config.seed), 3
        )
        state = train.create_train_state(config, init_rng, self.steps_per_epoch)
        self.state = parallel.put_replicated(state, self.mesh)
        if self.primary:
            summary = models.summary(models.build(**config.model))
            (self.workdir / "summary.txt").write_text(summary + "\n")
            print(summary)
            if self.mesh.size > 1:
                print(
                    f"Data-parallel over {self.mesh.size} {self.mesh.devices.flat[0].platform} "
                    f"devices in {jax.process_count()} process(es): "
                    f"{config.batch_size // self.mesh.size} images per device per step"
                )
        self.mngr = checkpoint.manager(
            self.workdir, keep_period=self.steps_per_epoch, repair=self.primary
        )
        self.writer = metrics.Writer(self.workdir) if self.primary else metrics.NullWriter()
        self.partial = {k: np.zeros(0, np.float32) for k in STEP_KEYS}
        self.last_epoch = None
        self.warned_collapse = False
        self._resume()
        self.train_x, self.train_y, self.test_x, self.test_y = parallel.put_replicated(
            arrays, self.mesh
        )

    def step_count(self) -> int:
        return int(parallel.to_host(self.state.step))

    def _resume(self) -> None:
        found = checkpoint.restore_latest(self.mngr, self.state, self.workdir)
        if found is None:
            self.writer.truncate(None, 0)
            return
        self.state, saved = found
        self.last_epoch = saved["last_epoch"]
        if saved["partial"]:
            self.partial = {k: np.asarray(v, np.float32) for k, v in saved["partial"].items()}
        step = self.step_count()
        self.writer.truncate(self.last_epoch, step)
        if self.primary:
            print(
                f"Resumed {self.workdir} at step {step} "
                f"(epoch {step // self.steps_per_epoch + 1}, "
                f"step {step % self.steps_per_epoch} of it)"
            )

    def _save(self) -> None:
        self.mngr.wait_until_finished()  # one save in flight at a time
        partial = (
            {k: v.tolist() for k, v in self.partial.items()} if len(self.partial["loss"]) else None
        )
        checkpoint.save(
            self.mngr,
            self.state,
            {"last_epoch": self.last_epoch, "partial": partial},
            self.step_count(),
        )

    def _fetch(self, window: list, epoch: int, step: int) -> None:
        """Bring the step metrics of a window ending at `step` to the host; stop on NaN or inf."""
        w = parallel.to_host(jax.tree.map(lambda *x: jnp.stack(x), *window))
        first = step - len(window) + 1
        bad = np.flatnonzero(~np.isfinite(w["loss"]))
        if len(bad):
            step = first + int(bad[0])
            kept = self.mngr.latest_step()
            raise Diverged(
                f"training loss became {w['loss'][bad[0]]} at epoch {epoch + 1}, step {step} "
                f"(lr {w['learning_rate'][bad[0]]:.3g}); "
                + (
                    f"last good checkpoint: step {kept}"
                    if kept is not None
                    else "no checkpoint kept"
                )
                + "; try a smaller --opt-lr, or --debug-nans to find the operation"
            )
        self.partial = {k: np.concatenate([self.partial[k], w[k]]) for k in STEP_KEYS}

    def _log_step_row(self, done: int, step: int) -> None:
        """A train_steps.jsonl row: the mean of the steps since the previous sample."""
        start = (done - 1) // self.config.log_every * self.config.log_every
        row = {"step": step}
        row.update({k: float(self.partial[k][start:done].mean()) for k in ("loss", "accuracy")})
        row["learning_rate"] = float(self.partial["learning_rate"][done - 1])
        self.writer.step(row)

    def _train_epoch(self, epoch: int, signals: _Signals, bar) -> None:
        c = self.config
        batch_idx = np.asarray(
            data.epoch_batches(self.data_rng, epoch, len(self.train_x), c.batch_size)
        )
        window = []
        step = self.step_count()  # then counted on the host: reading state.step waits per step
        for i in range(step % self.steps_per_epoch, self.steps_per_epoch):
            step += 1
            try:
                self.state, m = train.train_batch(
                    self.state,
                    self.train_x,
                    self.train_y,
                    batch_idx[i],
                    self.dropout_rng,
                    sharding=self.sharding,
                    shift=c.data.augment_shift,
                )
            except FloatingPointError as e:  # raised under --debug-nans
                raise Diverged(
                    f"{e} at epoch {epoch + 1}, step {step}; "
                    f"last good checkpoint: step {self.mngr.latest_step()}"
                ) from None
            window.append(m)
            done = i + 1
            log = done % c.log_every == 0 or done == self.steps_per_epoch
            save = c.checkpoint_every and step % c.checkpoint_every == 0
            if log or save or signals.received:
                self._fetch(window, epoch, step)
                bar.update(len(window) * c.batch_size)
                window = []
                if log:
                    self._log_step_row(done, step)
                    bar.set_postfix(
                        loss=f"{self.partial['loss'][-1]:.4f}",
                        acc=f"{self.partial['accuracy'][-1]:.2%}",
                        lr=f"{self.partial['learning_rate'][-1]:.3g}",
                        refresh=False,
                    )
            if done < self.steps_per_epoch and (save or signals.received):
                self._save()  # at the epoch's end, _end_epoch saves
            if signals.received:
                break

    def train(self) -> train.TrainState:
        from tqdm.auto import tqdm

        c = self.config
        start = time.perf_counter()
        with _Signals() as signals:
            for epoch in range(self.step_count() // self.steps_per_epoch, c.epochs):
                t0 = time.perf_counter()
                resumed_at = self.step_count() % self.steps_per_epoch
                # disable=None: no bar when not on a terminal (CI logs keep a line per epoch).
                with tqdm(
                    total=self.steps_per_epoch * c.batch_size,
                    initial=resumed_at * c.batch_size,
                    unit="img",
                    unit_scale=True,
                    desc=f"epoch {epoch + 1}/{c.epochs}",
                    leave=False,
                    disable=None if self.primary else True,
                ) as bar:
                    self._train_epoch(epoch, signals, bar)
                if signals.received and len(self.partial["loss"]) < self.steps_per_epoch:
                    self._stop(signals.received)
                self._end_epoch(epoch, t0)
                if signals.received:
                    self._stop(signals.received)
        self._close()
        if not self.primary:
            return self.state
        print(f"Done in {time.perf_counter() - start:.1f}s; work directory {self.workdir}")
        if c.plots:
            from mnist_jax import plots  # matplotlib only when drawing

            plots.draw_all(self.workdir, c.data.dir or None)
            print(f"Plots in {self.workdir / 'plots'}")
        return self.state

    def _end_epoch(self, epoch: int, t0: float) -> None:
        ev = train.eval_dataset(self.state, self.test_x, self.test_y, sharding=self.sharding)
        ev = parallel.to_host(ev)
        p = self.partial
        row = {
            "epoch": epoch + 1,
            "step": self.step_count(),
            "train_loss": float(p["loss"].mean()),
            "train_accuracy": float(p["accuracy"].mean()),
            "val_loss": float(ev["loss"]),
            "val_accuracy": float(ev["accuracy"]),
            "learning_rate": float(p["learning_rate"][-1]),
            "seconds": time.perf_counter() - t0,
        }
        self.last_epoch = row
        self.partial = {k: np.zeros(0, np.float32) for k in STEP_KEYS}
        self._save()
        self.writer.epoch(row)
        if self.primary:
            print(
                f"epoch {row['epoch']:3d}/{self.config.epochs}  loss {row['train_loss']:.4f}"
                f"  acc {row['train_accuracy']:.2%}  val_loss {row['val_loss']:.4f}"
                f"  val_acc {row['val_accuracy']:.2%}  lr {row['learning_rate']:.3g}"
                f"  {row['seconds']:.1f}s",
                flush=True,
            )
        label = diagnostics.collapsed_to(ev["predictions"])
        if label is not None and not self.warned_collapse:
            # Every process: dead_units runs a jitted program over the (global) test arrays.
            dead = diagnostics.dead_units(self.state, self.test_x)
            if self.primary:
                warning = diagnostics.collapse_warning(epoch + 1, label, row["val_accuracy"], dead)
                print(warning, file=sys.stderr)
            self.warned_collapse = True

    def _stop(self, signum: int) -> None:
        self._close()
        raise Interrupted(
            signum,
            (
                f"interrupted ({signal.Signals(signum).name}) at step {self.step_count()}; "
                f"checkpoint saved in {self.workdir / 'checkpoints'}. Resume by running the same "
                f"command again with --workdir {self.workdir}"
            ),
        )

    def _close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()
        self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> train.TrainState:
    """Train `config.epochs` epochs, evaluating on the test set after each; resume if possible.

    Writes to WORKDIR: config.json, summary.txt, metrics.jsonl (a line per epoch),
    train_steps.jsonl and tensorboard/ (sampled during training), checkpoints/ and plots/.
    """
    jax.config.update("jax_debug_nans", bool(config.debug_nans))
    parallel.initialize(config.distributed)
    run = Run(config, workdir)
    try:
        return run.train()
    except Diverged:
        run._close()
        raise
