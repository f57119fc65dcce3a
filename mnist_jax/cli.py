"""Command line of every stage: each config field is a flag (`data.dir` -> `--data-dir`).

User mistakes (bad flags, bad data, unusable work directory) print one line and exit 2; the
command-line plumbing the commands share is flags.py.
"""

import sys
from typing import Callable

import ml_collections

from mnist_jax import flags
from mnist_jax.config import ConfigError


def run(get_config: Callable[[], ml_collections.ConfigDict], argv=None) -> None:
    """Entry point of a stage module: parse flags, then train and evaluate."""
    from mnist_jax import loop
    from mnist_jax.data import DataError

    main = sys.modules.get(get_config.__module__)
    spec = getattr(main, "__spec__", None)
    stage = (spec.name if spec else get_config.__module__).rsplit(".", 1)[-1]
    config = get_config()
    config.name = stage
    prog = f"python -m experiments.{stage}"
    doc = (main.__doc__ or "").strip().splitlines()
    config = flags.parse_config(config, argv, prog=prog, description=doc[0] if doc else None)
    try:
        with flags.user_errors(ConfigError, DataError):
            loop.train_and_evaluate(config, config.workdir or f"runs/{stage}")
    except loop.Diverged as e:
        flags.fail(str(e), flags.EXIT_DIVERGED)
    except loop.Interrupted as e:
        flags.fail(str(e), e.exit_code)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        flags.fail("interrupted; the latest checkpoint (if any) is kept, run again to resume", 130)
