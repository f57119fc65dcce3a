"""Metrics as JSON lines in WORKDIR/metrics.jsonl: one flat object of scalars per epoch.

Plots and reports read these files, never the live run, so they work on old runs too.
"""

import json
from pathlib import Path


def read(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(path: str | Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def write(path: str | Path, rows: list[dict]) -> None:
    """Replace the file atomically (write a sibling, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
