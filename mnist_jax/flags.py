"""Command-line plumbing every command shares: config fields as flags, common flags, failures."""

import argparse
import contextlib
import errno
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import ml_collections

from mnist_jax import config as config_lib
from mnist_jax.config import flag_name, leaves  # leaves: also flags.leaves, as its callers know it

EXIT_USAGE = 2  # bad flags, data or work directory
EXIT_DIVERGED = 3  # the loss became NaN or infinite
EXIT_LOST = 4  # several processes: another one is gone (cli.lost)
EXIT_TRIALS_FAILED = 5  # a sweep: every trial failed (experiments.sweep)

# Flags several commands take, spelt, typed and described once; `add` declares them.
COMMON = {
    "workdir": dict(required=True, type=os.path.expanduser, help="work directory of a training run"),
    "data_dir": dict(
        default=None,
        help="the IDX directory (the four MNIST files, raw or .gz); default: the run's, else $MNIST_DATA_DIR, else TFDS",
    ),
    "step": dict(type=int, default=None, help="checkpoint step (default: latest)"),
    "seeds": dict(type=int, default=5, help="how many seeds to train (default %(default)s)"),
    "epochs": dict(type=int, default=None, help="epochs each run trains (default: the stage's)"),
    "train_limit": dict(type=int, default=0, help="train on the first N training images only (0: all)"),
    "json": dict(default="", help="where to write the results (default %(default)s)"),
    "restart": dict(action="store_true", help="discard the runs already in the work directory"),
    "val_split": dict(type=int, default=0, help="hold out N training images to choose on (0: none)"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def add(parser: argparse.ArgumentParser, *names: str, **changed) -> None:
    """Declare COMMON flags `names`, then `changed`: a default (`json="runs/x.json"`) or add_argument keywords."""
    for name in (*names, *changed):
        change = changed.get(name, {})
        kwargs = {**COMMON[name], **(change if isinstance(change, dict) else {"default": change})}
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def fail(message: str, code: int = EXIT_USAGE):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextlib.contextmanager
def user_errors(*errors: type[Exception], code: int = EXIT_USAGE):
    """Inside, an exception of the types `errors` ends the command as `fail(str(e), code)`."""
    try:
        yield
    except errors as e:
        fail(str(e), code)


def disk_full(error: BaseException) -> str | None:
    """The file a write failed on for want of space, if `error` or its cause is an ENOSPC OSError
    or tensorstore's RESOURCE_EXHAUSTED ("" if it names none; a checkpoint: its step's directory)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return str(error.filename or "")
        if "No space left on device" in text or "os_error_code='28'" in text:
            found = re.search(r'"(/[^"]+)"', text)
            return re.sub(r"\.orbax-checkpoint-tmp.*", "", found.group(1)) if found else ""
        error = error.__cause__ or error.__context__
    return None


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` via a sibling and a rename: a kill leaves the old file or the new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str, obj) -> None:
    """Write results to --json PATH, or fail with one line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        fail(f"--json {path}: cannot write ({e.strerror})")
    print(f"Results in {path}")


def _parse_bool(text: str) -> bool:
    for value, words in ((True, ("1", "true", "yes", "on")), (False, ("0", "false", "no", "off"))):
        if text.lower() in words:
            return value
    raise ValueError(text)


def _parser_for(default):
    """An argparse `type` that parses a flag like the field's default value."""
    if isinstance(default, bool):
        convert = _parse_bool
    elif isinstance(default, (tuple, list)):
        item = type(default[0]) if default else int
        convert = lambda text: tuple(item(x) for x in text.split(",") if x.strip())
    else:
        convert = type(default)
    parse = lambda text: convert(text)
    parse.__name__ = type(default).__name__  # argparse names it in "invalid int value"
    return parse


def field_help(path: str, default, choices: dict) -> str:
    """A config field's --help: its line (config.HELP), its choices (config.choices()) if a fixed set, its default."""
    text = config_lib.HELP.get(path, f"config {path}")  # a field a stage adds without a line
    if path in choices:
        text += f"; one of {', '.join(map(str, choices[path]))}"
    shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
    return text + (f" (default: {shown})" if shown else "")


def parse_config(config: ml_collections.ConfigDict, argv=None, prog=None, description=None):
    """Override `config` from command-line flags; returns the config."""
    parser = Parser(prog=prog, description=description)
    choices = config_lib.choices()
    for path, value in leaves(config):
        if path == "name":
            continue
        kwargs = dict(nargs="?", const=True) if isinstance(value, bool) else {}
        kwargs.update(type=_parser_for(value), default=argparse.SUPPRESS, metavar=type(value).__name__.upper())
        parser.add_argument(flag_name(path), dest=path, **kwargs, help=field_help(path, value, choices))
    for path, value in vars(parser.parse_args(argv)).items():
        try:
            config.update_from_flattened_dict({path: value})
        except (TypeError, ValueError):  # argparse hands `--flag=--` over as []
            parser.error(f"argument {flag_name(path)}: invalid value {value!r}")
    return config


def cannot_write(directory: Path) -> str | None:
    """Why no file can be created in `directory`, or None; from access(2), which sees a read-only
    filesystem and (for root too) an immutable directory, so nothing is written to find out."""
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    return os.strerror(errno.EPERM if os.geteuid() == 0 else errno.EACCES)
