"""The training loop: compiled calls of K steps, evaluation, logging, checkpoints and resume.

A run is a function of (config, seed): the data order of an epoch comes from (seed, epoch), the
dropout key of a step from (seed, step). A checkpoint stores the model, the optimizer and the
per-step metrics of the unfinished epoch, so a run resumed from any checkpoint, mid-epoch
included, ends bit for bit as the uninterrupted run (tests/test_resume.py kills runs to check).

`train_group` is the whole loop, for one seed or for N seeds vmapped in one program:
`runs.setup` and `runs.resume`, then per epoch `train_epoch` and `end_epoch`. An epoch's batch
indices go to the device once; the epoch runs in calls of `steps_per_call` steps (a compiled
lax.scan, `train.train_steps`), aligned to multiples of K within the epoch and to checkpoints,
so the calls of a resumed run are those of the uninterrupted one. Host work (fetching metrics,
the NaN check, log rows, checkpoints, signals) happens between calls, at the first call end
past a log row; with K = 1 (the CPU) that is every `log_every` steps, as before.
Every command that trains (the stage CLI, --seeds, experiments.seeds and speedrun, the
benchmark's time to accuracy) trains through `train_group`.
"""

import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_jax import data, diagnostics, parallel, runs, train
from mnist_jax.config import XLA_CPU, flag_name, validate
from mnist_jax.runs import Progress, Run, done_steps, step_count


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


def steps_per_call(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """config.steps_per_call, or per backend: 1 on the CPU (see train.train_steps), else the
    whole epoch."""
    k = config.steps_per_call or (1 if jax.default_backend() == "cpu" else steps_per_epoch)
    return min(k, steps_per_epoch)


def call_end(config, k: int, done: int, step: int, steps_per_epoch: int) -> int:
    """The step of the epoch where the call starting at `done` ends: the next multiple of K, a
    checkpoint or the epoch's end. A function of the step alone, so resuming keeps the calls."""
    ends = [steps_per_epoch, (done // k + 1) * k]
    if config.checkpoint_every:
        ends.append(done + config.checkpoint_every - step % config.checkpoint_every)
    return min(ends)


class Program:
    """The group's compiled functions, compiled on first use; `compile_s` sums their times."""

    def __init__(self, group: list[Run], vmap: bool):
        self.runs, self.vmap, self.compiled, self.compile_s = group, vmap, {}, 0.0
        r = group[0]
        self.mesh = r.train_x.sharding.mesh
        self.rngs = (
            jax.device_put(
                jnp.stack([x.dropout_rng for x in group]), parallel.seed_sharding(self.mesh)
            )
            if vmap
            else r.dropout_rng
        )

    def _get(self, key, lower):
        if key not in self.compiled:
            t = time.perf_counter()
            self.compiled[key] = lower().compile()
            self.compile_s += time.perf_counter() - t
        return self.compiled[key]

    def order(self, epoch: int):
        """The epoch's batch indices on the device: [S, B], or [N, S, B] for vmapped seeds."""
        b, n = self.runs[0].config.batch_size, len(self.runs[0].train_x)
        orders = [np.asarray(data.epoch_batches(r.data_rng, epoch, n, b)) for r in self.runs]
        if self.vmap:
            return jax.device_put(np.stack(orders), parallel.seed_sharding(self.mesh))
        return parallel.put_replicated(orders[0], self.mesh)

    def train(self, state, order, start: int, steps: int):
        """`steps` steps from row `start` of `order`: (state, metrics each [N, steps])."""
        r = self.runs[0]
        args = (state, r.train_x, r.train_y, order, np.int32(start), self.rngs)
        if self.vmap:
            fn, static = train.train_seeds, dict(steps=steps, shift=r.config.data.augment_shift)
        else:
            fn, static = train.train_steps, dict(steps=steps, sharding=r.sharding, shift=r.config.data.augment_shift)  # fmt: skip
        if r.config.debug_nans:  # jax_debug_nans checks jitted calls, not compiled (AOT) ones
            return fn(*args, **static)
        state, m = self._get(("train", steps), lambda: fn.lower(*args, **static))(*args)
        return state, m  # [N, steps] vmapped, else [steps]: fetch adds the seed axis

    def evaluate(self, state) -> dict:
        """Test loss, accuracy [N], predictions [N, n] and units alive {layer: [N, units]},
        on the host."""
        r = self.runs[0]
        tx, ty = r.test_x, r.test_y
        if self.vmap:
            fn = self._get("eval", lambda: train.eval_seeds.lower(state, tx, ty))
            return parallel.to_host(fn(state, tx, ty))
        fn = self._get("eval", lambda: train.eval_dataset.lower(state, tx, ty, sharding=r.sharding))
        return jax.tree.map(lambda v: v[None], parallel.to_host(fn(state, tx, ty)))


def fetch(group: list[Run], partial: dict, chunk: list, epoch: int) -> dict:
    """`partial` extended by a chunk's step metrics, brought to the host; stop on NaN or inf."""
    # Joined on the host: no device op that --debug-nans would stop on before this check.
    host = parallel.to_host(chunk)
    w = {
        k: np.concatenate([m[k].reshape(len(group), -1) for m in host], axis=1)
        for k in runs.STEP_KEYS
    }
    bad = np.argwhere(~np.isfinite(w["loss"]))
    if len(bad):
        i, j = bad[0]
        run, spe = group[i], group[i].steps_per_epoch
        step = epoch * spe + partial["loss"].shape[1] + int(j) + 1
        kept = run.mngr.latest_step()
        who = f"seed {run.config.seed}: " if len(group) > 1 else ""
        raise Diverged(
            f"{who}training loss became {w['loss'][i, j]} at epoch {epoch + 1}, step {step} "
            f"(lr {w['learning_rate'][i, j]:.3g}); "
            + (f"last good checkpoint: step {kept}" if kept is not None else "no checkpoint kept")
            + "; try a smaller --opt-lr, or --debug-nans to find the operation"
        )
    return {k: np.concatenate([partial[k], w[k]], axis=1) for k in runs.STEP_KEYS}


def log_rows(group: list[Run], partial: dict, first: int, done: int, epoch: int, bar) -> None:
    """The train_steps.jsonl rows of the log points in (first, done] (each the mean of the steps
    since the previous one), and the epoch's end; then the bar's figures."""
    config, spe = group[0].config, group[0].steps_per_epoch
    ends = [b for b in range(first + 1, done + 1) if b % config.log_every == 0 or b == spe]
    for end in ends:
        start = (end - 1) // config.log_every * config.log_every
        for i, run in enumerate(group):
            row = {"step": epoch * spe + end}
            row.update({k: float(partial[k][i, start:end].mean()) for k in ("loss", "accuracy")})
            row["learning_rate"] = float(partial["learning_rate"][i, end - 1])
            run.writer.step(row)
    if ends:
        bar.set_postfix(
            loss=f"{partial['loss'][:, -1].mean():.4f}",
            acc=f"{partial['accuracy'][:, -1].mean():.2%}",
            lr=f"{partial['learning_rate'][0, -1]:.3g}",
            refresh=False,
        )


def train_epoch(group: list[Run], program: Program, progress: Progress, epoch: int,
                signals: _Signals, bar, save: bool = True) -> Progress:  # fmt: skip
    """The epoch's steps (its rest, after a resume); stops early, checkpointed, at a signal."""
    config, spe = group[0].config, group[0].steps_per_epoch
    k = steps_per_call(config, spe)
    order = program.order(epoch)
    done = done_steps(progress)
    state = progress.state
    while done < spe:
        first, chunk = done, []
        while True:  # calls until host work is due
            step = epoch * spe + done
            end = call_end(config, k, done, step, spe)
            try:
                state, m = program.train(state, order, done, end - done)
            except FloatingPointError as e:  # raised under --debug-nans
                raise Diverged(
                    f"{e} at epoch {epoch + 1}, steps {step + 1}-{step + end - done}; "
                    f"last good checkpoint: step {group[0].mngr.latest_step()}"
                ) from None
            chunk.append(m)
            done = end
            step = epoch * spe + done
            due = config.checkpoint_every and step % config.checkpoint_every == 0
            logged = done // config.log_every > first // config.log_every
            if done == spe or due or logged or signals.received:
                break
        progress = progress._replace(
            state=state, partial=fetch(group, progress.partial, chunk, epoch)
        )
        bar.update((done - first) * config.batch_size)
        log_rows(group, progress.partial, first, done, epoch, bar)
        stop = signals.stop(range(epoch * spe + first + 1, step + 1))
        if save and done < spe and (due or stop):
            runs.save(group, progress, program.vmap)  # at the epoch's end, end_epoch saves
        if stop:
            break
    return progress


def end_epoch(group: list[Run], program: Program, progress: Progress, epoch: int, seconds: float,
              save: bool = True) -> tuple[Progress, dict]:  # fmt: skip
    """Evaluate, checkpoint, log and print the finished epoch; also its evaluation
    (Program.evaluate: predictions, units alive)."""
    p = progress.partial
    ev = program.evaluate(progress.state)
    step = step_count(progress.state)
    rows = []
    for i, run in enumerate(group):
        rows.append({
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(p["loss"][i].mean()),
            "train_accuracy": float(p["accuracy"][i].mean()),
            "val_loss": float(ev["loss"][i]),
            "val_accuracy": float(ev["accuracy"][i]),
            "learning_rate": float(p["learning_rate"][i, -1]),
            "seconds": seconds,
        })  # fmt: skip
    progress = Progress(progress.state, runs.no_steps(len(group)), rows)
    if save:
        runs.save(group, progress, program.vmap)
    for run, row in zip(group, rows):
        run.writer.epoch(row)
    if group[0].primary:
        row, epochs = rows[0], group[0].config.epochs
        if len(group) == 1:
            print(
                f"epoch {row['epoch']:3d}/{epochs}  loss {row['train_loss']:.4f}"
                f"  acc {row['train_accuracy']:.2%}  val_loss {row['val_loss']:.4f}"
                f"  val_acc {row['val_accuracy']:.2%}  lr {row['learning_rate']:.3g}"
                f"  {seconds:.1f}s",
                flush=True,
            )
        else:
            acc = ev["accuracy"]
            print(
                f"epoch {row['epoch']:3d}/{epochs}  {len(group)} seeds: val_acc "
                f"{np.median(acc):.2%} median, {acc.min():.2%} to {acc.max():.2%}"
                f"  lr {row['learning_rate']:.3g}  {seconds:.1f}s",
                flush=True,
            )
    return progress, ev


def dead_units(alive: dict, i: int) -> dict[str, tuple[int, int]]:
    """Seed i's dead units from an evaluation's units alive {layer: [N, units]}."""
    return diagnostics.dead_counts({k: v[i] for k, v in alive.items()})


def warn_if_collapsed(group: list[Run], progress: Progress, ev: dict, warned: set) -> None:
    """Warn (process 0, stderr), once a seed, if a model predicts one class for every image."""
    for i, run in enumerate(group):
        label = diagnostics.collapsed_to(ev["predictions"][i])
        if label is None or i in warned:
            continue
        warned.add(i)
        # Counted in the evaluation's own pass: no second pass, no collective here.
        dead = dead_units(ev["alive"], i)
        if run.primary:
            row = progress.last_epoch[i]
            warning = diagnostics.collapse_warning(row["epoch"], label, row["val_accuracy"], dead)
            who = f"seed {run.config.seed}: " if len(group) > 1 else ""
            print(who + warning, file=sys.stderr)


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


class Outcome(NamedTuple):
    """What train_group leaves: the runs, their final progress, the last evaluation's test
    predictions [N, n] and units alive {layer: [N, units]}, the seconds spent compiling."""

    runs: list[Run]
    progress: Progress
    predictions: np.ndarray
    alive: dict
    compile_s: float
    vmap: bool


def enable_compile_cache(config: ml_collections.ConfigDict) -> None:
    """JAX's persistent compilation cache in config.compile_cache, unless the environment
    names one ($JAX_COMPILATION_CACHE_DIR, which JAX reads itself)."""
    if config.compile_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compile_cache))


def set_xla_cpu(config: ml_collections.ConfigDict) -> None:
    """Add config.xla_cpu's XLA_FLAGS (config.XLA_CPU). XLA reads them once, when JAX's backend
    starts, so this must run before anything touches a device."""
    validate(config)  # a bad name: one line naming the flag
    wanted = XLA_CPU[config.xla_cpu].split()
    current = os.environ.get("XLA_FLAGS", "")
    if all(f in current.split() for f in wanted):
        return
    from jax._src import xla_bridge  # no public way to ask whether the backend has started

    if xla_bridge.backends_are_initialized():
        raise runs.ConfigError(
            f"{flag_name('xla_cpu')} {config.xla_cpu}: JAX's backend has already started in this "
            f"process; set XLA_FLAGS={' '.join(wanted)!r} before JAX starts instead"
        )
    os.environ["XLA_FLAGS"] = " ".join([current, *wanted]).strip()


def train_group(config: ml_collections.ConfigDict, workdirs: list, vmap: bool = False, *,
                save: bool = True, target: float | None = None) -> Outcome:  # fmt: skip
    """Train seeds config.seed.. (one per work directory; several only vmapped) for
    config.epochs epochs, evaluating on the test set after each; resume if possible.

    save=False: no checkpoints (timing runs). target: stop after the epoch where every seed's
    test accuracy reaches it. Each work directory gets config.json, summary.txt, metrics.jsonl
    (a line per epoch), train_steps.jsonl and tensorboard/ (sampled) and checkpoints/.
    """
    set_xla_cpu(config)
    jax.config.update("jax_debug_nans", bool(config.debug_nans))
    enable_compile_cache(config)
    parallel.initialize(config.distributed)
    if vmap and jax.process_count() > 1:
        raise runs.ConfigError("--seed-mode vmap: one process only; use --seed-mode turn")
    group, state = runs.setup(config, [Path(w) for w in workdirs], vmap)
    progress = runs.resume(group, state, vmap)
    program = Program(group, vmap)
    spe = group[0].steps_per_epoch
    step = step_count(progress.state)  # recipe.check refused a run past config.epochs
    start, warned, ev = time.perf_counter(), set(), None
    with _Signals(jax.process_count()) as signals:
        try:
            for epoch in range(step // spe, config.epochs):
                t0, c0 = time.perf_counter(), program.compile_s
                with _bar(group[0], epoch, done_steps(progress)) as bar:
                    progress = train_epoch(group, program, progress, epoch, signals, bar, save)
                if done_steps(progress) == spe:  # the epoch finished
                    seconds = time.perf_counter() - t0 - (program.compile_s - c0)
                    progress, ev = end_epoch(group, program, progress, epoch, seconds, save)
                    warn_if_collapsed(group, progress, ev, warned)
                if signals.stopping:
                    where = group[0].workdir if len(group) == 1 else group[0].workdir.parent
                    raise Interrupted(
                        signals.stopping,
                        f"interrupted ({signal.Signals(signals.stopping).name}) at step "
                        f"{step_count(progress.state)}; checkpoint saved in "
                        f"{where / 'checkpoints' if len(group) == 1 else where}. Resume by "
                        f"running the same command again with --workdir {where}",
                    )
                if (
                    target is not None
                    and ev is not None
                    and all(r["val_accuracy"] >= target for r in progress.last_epoch)
                ):
                    break
        except jax.errors.JaxRuntimeError:
            if jax.process_count() > 1:
                raise  # another process is gone: no collective (close's included) can complete
            runs.close(group)
            raise
        except BaseException:
            runs.close(group)
            raise
    runs.close(group)
    if ev is None:  # nothing left to train: the run had finished
        ev = program.evaluate(progress.state)
    if group[0].primary:
        print(
            f"Done in {time.perf_counter() - start:.1f}s (compiling {program.compile_s:.1f}s); "
            f"work director{'y' if len(group) == 1 else 'ies'} "
            + (str(group[0].workdir) if len(group) == 1 else f"{group[0].workdir.parent}/seed_*")
        )
    return Outcome(group, progress, ev["predictions"], ev["alive"], program.compile_s, vmap)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> train.TrainState:
    """Train one seed, config.seed, in `workdir` (see train_group): its final TrainState."""
    return train_group(config, [workdir]).progress.state
