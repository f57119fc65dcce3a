"""Command line of every stage: each config field is a flag (`data.dir` -> `--data-dir`).

User mistakes (bad flags, bad data, unusable work directory) print one line and exit 2.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import ml_collections

from mnist_jax.config import ConfigError, flag_name

EXIT_USAGE = 2  # bad flags, data or work directory
EXIT_DIVERGED = 3  # the loss became NaN or infinite


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _parser_for(default):
    """An argparse `type` that parses a flag like the field's default value."""
    if isinstance(default, bool):
        convert = _parse_bool
    elif isinstance(default, (tuple, list)):
        item = type(default[0]) if default else int

        def convert(text):
            return tuple(item(x) for x in text.split(",") if x.strip())

    else:
        convert = type(default)

    def parse(text):
        return convert(text)

    parse.__name__ = type(default).__name__  # argparse names it in "invalid int value"
    return parse


def leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted path, value) for every leaf field."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def parse_config(config: ml_collections.ConfigDict, argv=None, prog=None, description=None):
    """Override `config` from command-line flags; returns the config."""
    parser = Parser(prog=prog, description=description)
    paths = {}
    for path, value in leaves(config):
        if path == "name":
            continue
        shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        flag = flag_name(path)
        paths[flag[2:].replace("-", "_")] = path
        flag_kwargs = dict(nargs="?", const=True) if isinstance(value, bool) else {}
        parser.add_argument(
            flag,
            **flag_kwargs,
            type=_parser_for(value),
            default=argparse.SUPPRESS,
            metavar=type(value).__name__.upper(),
            help=f"config {path} (default: {shown!s})",
        )
    args = parser.parse_args(argv)
    for dest, value in vars(args).items():
        *parents, key = paths[dest].split(".")
        node = config
        for part in parents:
            node = node[part]
        node[key] = value
    return config


def write_json(path: str, obj) -> None:
    """Write results to --json PATH, or fail with one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        fail(f"--json {path}: cannot write ({e.strerror})")
    print(f"Results in {path}")


def fail(message: str, code: int = EXIT_USAGE):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


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
    config = parse_config(config, argv, prog=prog, description=doc[0] if doc else None)
    try:
        loop.train_and_evaluate(config, config.workdir or f"runs/{stage}")
    except (ConfigError, DataError) as e:
        fail(str(e))
    except loop.Diverged as e:
        fail(str(e), EXIT_DIVERGED)
    except loop.Interrupted as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        fail("interrupted; the latest checkpoint (if any) is kept, run again to resume", 130)
