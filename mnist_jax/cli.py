"""The command of every stage: parse its flags, train and evaluate, then draw the plots.

`python -m experiments.<stage> [--flag value ...]`: each config field is a flag (flags.py). The
one place that wires the process's set-up, training and exit codes: a user mistake prints one
line and exits 2, a diverged run 3, a signal 128 + its number, a lost process 4.
"""

import os
import sys
from pathlib import Path
from typing import Callable

import jax

from mnist_jax import checkpoint, flags, loop, recipe, seeds, startup
from mnist_jax import hooks as hooks_lib
from mnist_jax.config import ConfigError
from mnist_jax.data import DataError


def run(get_config: Callable, argv=None, *, hooks=(), step_fn=None, eval_metrics=None) -> None:
    """Entry point of a stage module: parse flags, train and evaluate, draw the plots. A stage
    passes its own parts as loop.train takes them: hooks (after the built-in ones and the
    plots), step_fn (its own step), eval_metrics ({name: fn(logits, labels)})."""
    main = sys.modules.get(get_config.__module__)
    spec = getattr(main, "__spec__", None)
    stage = (spec.name if spec else get_config.__module__).rsplit(".", 1)[-1]
    config = get_config()
    config.name = stage
    prog = f"python -m experiments.{stage}"
    doc = (main.__doc__ or "").strip().splitlines()
    config = flags.parse_config(config, argv, prog=prog, description=doc[0] if doc else None)
    workdir = os.path.expanduser(config.workdir) if config.workdir else f"runs/{stage}"
    try:
        with flags.user_errors(ConfigError, DataError):
            startup.start(config)  # the process's set-up, once: XLA flags, caches, hosts
            for w in [Path(workdir), *seeds.workdirs(config, workdir)]:  # before any write
                recipe.check_workdir(w, restart=config.restart)
            # The curves as it trains, the rest at each run's end, on process 0.
            plots = [hooks_lib.LiveCurves(), hooks_lib.Plots()] if config.plots else []
            runtime = startup.resolve(config)  # the backend's choices, once a command
            parts = dict(hooks=(*plots, *hooks), step_fn=step_fn, eval_metrics=eval_metrics)
            seeds.train(config, workdir, runtime=runtime, **parts)
    except loop.Diverged as e:
        flags.fail(str(e), flags.EXIT_DIVERGED)
    except loop.Interrupted as e:
        flags.fail(str(e), e.exit_code)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        flags.fail("interrupted; the latest checkpoint (if any) is kept, run again to resume", 130)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        lost(e, workdir)
    except Exception as e:
        where = flags.disk_full(e)
        if where is None:
            raise
        dirs = [w for w in seeds.workdirs(config, workdir) if checkpoint.steps(w)]
        kept = [f"step {checkpoint.steps(w)[0]} in {w / 'checkpoints'}" for w in dirs]
        kept = f"the last checkpoint ({', '.join(kept)}) is kept" if kept else "no checkpoint yet"
        flags.fail(
            f"{where or workdir}: no space left on device; {kept}: free some space and run the "
            "same command again to resume"
        )


def lost(error: Exception, workdir: str) -> None:
    """Another process is gone (a collective failed): one line, and leave now. No exit handler runs: jax.distributed's
    shutdown and Orbax's would wait for a process that will not come back; the checkpoints are complete (Orbax renames
    a finished one)."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    print(
        f"error: process {jax.process_index()}: a collective across the "
        f"{jax.process_count()} processes failed, another process is likely gone ({reason}); "
        f"the last complete checkpoint in {Path(workdir) / 'checkpoints'} is kept: run the same "
        "command again on every process to resume",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(flags.EXIT_LOST)
