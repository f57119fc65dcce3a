"""The process's set-up, once, and the choices that depend on the backend, in one place.

`start(config)` is what a command calls first: XLA's flags, JAX's compilation cache and
`jax.distributed` are the process's, never the library's. `resolve` decides, once a command, the
settings whose best value depends on the backend: a frozen `Runtime`, recorded beside the config.
"""

import dataclasses
import logging
import os
import sys
from pathlib import Path

import jax
import ml_collections

from mnist_jax import flags, parallel
from mnist_jax.config import XLA_CPU, ConfigError, flag_name, validate

# The flags XLA_CPU's settings set, by name: XLA_FLAGS holding one of them has chosen the kernels.
_KERNEL_FLAGS = {f.split("=")[0] for flags_ in XLA_CPU.values() for f in flags_.split()}


def _kernel_flags() -> list[str]:
    return [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] in _KERNEL_FLAGS]


def xla_cpu_in_effect() -> str:
    """The XLA_CPU setting this process's XLA_FLAGS give ("custom": kernel flags of no setting's)."""
    chosen = sorted(_kernel_flags())
    return next((name for name, f in XLA_CPU.items() if sorted(f.split()) == chosen), "custom")


def set_xla_cpu(config: ml_collections.ConfigDict) -> None:
    """Set config.xla_cpu's XLA_FLAGS (config.XLA_CPU) before the backend starts and reads them. auto: ynn-no-conv
    (conv_bn's step 1.2x faster on the CPU, docs/performance.md), unless XLA_FLAGS choose the kernels already or
    the backend has started (a notebook, a script that used JAX first): then what it has, recorded (resolve)."""
    from jax._src import xla_bridge  # no public way to ask whether the backend has started

    started, chosen = xla_bridge.backends_are_initialized(), _kernel_flags()
    if config.xla_cpu == "auto" and (started or chosen):
        return
    wanted = XLA_CPU["ynn-no-conv" if config.xla_cpu == "auto" else config.xla_cpu].split()
    if sorted(chosen) == sorted(wanted):
        return
    if started:
        instead = f"set XLA_FLAGS={' '.join(wanted)!r}" if wanted else f"leave {' '.join(chosen)} out of XLA_FLAGS"
        raise ConfigError(
            f"{flag_name('xla_cpu')} {config.xla_cpu}: JAX's backend has already started in this "
            f"process; {instead} before JAX starts instead"
        )
    others = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in chosen]
    os.environ["XLA_FLAGS"] = " ".join(others + wanted)


def _leftover(unraisable) -> bool:
    """An Orbax read left behind by a failed restore (a damaged checkpoint, already reported):
    some 80 lines of traceback at garbage collection or from the closed event loop."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return True
    closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
    return closed and unraisable.object is None


def _not_disk_full(record: logging.LogRecord) -> bool:
    """Orbax logs a failed background save, then raises it; a full disk is said once (cli.run)."""
    error = record.exc_info[1] if record.exc_info else None
    return error is None or flags.disk_full(error) is None


def quiet_orbax() -> None:
    """Keep Orbax's echoes of an error the command reports itself off stderr (idempotent)."""
    if getattr(sys.unraisablehook, "quiet_orbax", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _leftover(unraisable):
            previous(unraisable)

    hook.quiet_orbax = True
    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_not_disk_full)  # the same one: added once


def start(config: ml_collections.ConfigDict) -> None:
    """Set up this process for `config`: a command calls this once, first."""
    validate(config)  # a bad value: one line naming the flag, before anything starts
    quiet_orbax()
    set_xla_cpu(config)
    # $JAX_COMPILATION_CACHE_DIR, when set, wins: JAX reads it itself (the test suite sets one).
    if config.compile_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = Path(os.path.expanduser(config.compile_cache))
        try:  # else JAX warns at every compile that it cannot write the cache
            cache.mkdir(parents=True, exist_ok=True)
            reason = flags.cannot_write(cache)
        except OSError as e:
            reason = e.strerror or type(e).__name__
        if reason:
            raise ConfigError(f"{flag_name('compile_cache')} {cache}: cannot write there ({reason})")
        jax.config.update("jax_compilation_cache_dir", str(cache))
    parallel.initialize(config.distributed)  # before resolve: the seed mode needs the count


# On the CPU, a convolutional network's steps a call, unrolled (train.train_steps): 8 made conv_bn's step 1-1.5 ms
# faster (the benchmark's medians; windows in one process) and its first call ~3 s slower to compile, repaid after
# 2,000-3,000 steps: a shorter run takes one step a call (fit_to_run). The dense networks' steps were slower
# unrolled (dense_dropout's epoch 1.4x): one a call. Measured: docs/performance.md.
CPU_STEPS_PER_CALL, UNROLL_REPAID = 8, 2000


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The choices a command makes once, at its start, for the backend it runs on; the config
    stays as typed, and these are recorded beside it (config_history.jsonl's runtime)."""

    steps_per_call: int  # 0: the whole epoch in one compiled call
    seed_mode: str  # "vmap" or "turn"
    conv_grad: str  # "shifts", "space_to_depth" or "xla"
    xla_cpu: str  # the XLA:CPU kernels this process runs (XLA_CPU's name): what config.xla_cpu set, or found


def resolve(config: ml_collections.ConfigDict, seeds: int | None = None) -> Runtime:
    """The settings left to the backend (seeds: the runs trained together, default config.seeds). On the CPU, XLA:CPU
    runs a convolution in a loop body several times slower (jax-ml/jax#12868: no loop), makes one vmapped over
    per-seed weights a grouped one, 4-5x slower (the conv stages' seeds in turn), and computes the stride-2 input
    gradient 4x faster as a stride-1 convolution (space_to_depth), and a one-channel first layer's 6x faster as shifted
    multiply-adds (shifts, which does both). Measured: performance.md."""
    cpu = jax.default_backend() == "cpu"
    alone = (seeds or config.seeds) == 1 or jax.process_count() > 1
    auto_mode = "turn" if alone or (cpu and config.model.name == "conv") else "vmap"
    k = config.steps_per_call
    if k == 0 and cpu:  # for a long run: fit_to_run gives a short one 1
        k = CPU_STEPS_PER_CALL if config.model.name == "conv" else 1
    return Runtime(
        steps_per_call=k,
        seed_mode=auto_mode if config.seed_mode == "auto" else config.seed_mode,
        conv_grad=("shifts" if cpu else "xla") if config.conv_grad == "auto" else config.conv_grad,
        xla_cpu=xla_cpu_in_effect(),
    )


def fit_to_run(runtime: Runtime, config: ml_collections.ConfigDict, steps: int) -> Runtime:
    """runtime for a run of `steps` steps: the CPU's unrolled calls (config.steps_per_call 0) only where the
    steps repay compiling them."""
    auto = config.steps_per_call == 0 and runtime.steps_per_call == CPU_STEPS_PER_CALL
    return dataclasses.replace(runtime, steps_per_call=1) if auto and steps < UNROLL_REPAID else runtime
