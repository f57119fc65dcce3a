"""Metrics as JSON lines in the work directory, mirrored to TensorBoard.

  metrics.jsonl      one flat object of scalars per epoch (epoch, step, train_, test_ and,
                     with a validation split, val_ loss and accuracy, learning_rate, seconds)
  train_steps.jsonl  training loss, accuracy and learning rate sampled every `log_every` steps
                     (each the mean over the steps since the last sample), as the codelab's
                     PlotTraining draws them
  tensorboard/       the same scalars: `tensorboard --logdir WORKDIR/tensorboard`

Plots and reports read these files, never the live run, so they work on old runs too.
"""

import functools
import json
import sys
from pathlib import Path

from mnist_jax import flags

EPOCHS_FILE, STEPS_FILE = "metrics.jsonl", "train_steps.jsonl"


LAST = ("learning_rate",)  # a row's value of these is the one at its step, not a mean


def upgrade(row: dict | None) -> dict | None:
    """A row as this code names it: files written before validation splits named the test
    set's metrics val_*; a row with no test_* metric is one of those."""
    if row is None or any(k.startswith("test_") for k in row):
        return row
    return {("test_" + k[4:] if k.startswith("val_") else k): v for k, v in row.items()}


def read(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file. A last line cut short (a kill, a full disk) is dropped with
    a warning: the next start writes the rows again from the checkpoint's record."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(upgrade(json.loads(line)))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
            print(f"warning: {path}: its last line is incomplete (a write cut short); dropped", file=sys.stderr)
    return rows


def append(path: str | Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def write(path: str | Path, rows: list[dict]) -> None:
    """Replace the file atomically (flags.write_atomic)."""
    flags.write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def summary_writer():
    """tensorboardX's SummaryWriter without importing torch (2.7 s of a command's start-up,
    for tensors we never pass): a None in sys.modules makes `import torch` fail, as handled."""
    hide = "torch" not in sys.modules
    sys.modules.setdefault("torch", None)
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


class Writer:
    """Appends epoch and step rows to the JSON-lines files and to TensorBoard."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)

    @functools.cached_property
    def tb(self):  # on the first row: a finished run run again adds no empty events file
        return summary_writer()(str(self.workdir / "tensorboard"))

    def truncate(self, last_epoch: dict | None, step: int) -> None:
        """On (re)start at `step`, keep each epoch and step row once: drop rows written after
        that checkpoint, and put back the last epoch's row if the run died before writing it."""
        epochs = []
        if last_epoch is not None:
            rows = read(self.workdir / EPOCHS_FILE)
            epochs = [m for m in rows if m["epoch"] < last_epoch["epoch"]] + [last_epoch]
        write(self.workdir / EPOCHS_FILE, epochs)
        write(self.workdir / STEPS_FILE, [m for m in read(self.workdir / STEPS_FILE) if m["step"] <= step])

    def epoch(self, row: dict) -> None:
        append(self.workdir / EPOCHS_FILE, row)
        for key, value in row.items():
            if key not in ("epoch", "step"):
                self.tb.add_scalar(f"epoch/{key}", value, row["step"])
        self.tb.flush()

    def step(self, row: dict) -> None:
        append(self.workdir / STEPS_FILE, row)
        for key, value in row.items():
            if key != "step":
                self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if "tb" in self.__dict__:
            self.tb.close()


class NullWriter:
    """The Writer of processes other than the first: they train, process 0 writes."""

    truncate = epoch = step = close = lambda self, *args: None
