"""The README's results table as records: each stage's row, what made it and how it began.

    python -m experiments.dense_relu --seeds 5 --data-dir ../shared/data/mnist  # runs/dense_relu
    python -m experiments.rows dense_relu --wall 96     # records docs/rows/dense_relu.json
    python -m experiments.rows                          # the table's figures, from the records

A record holds the row's figures (the final test accuracy over the seeds), the command and its
wall time, and the first steps of seed 0 as that run logged them (train_steps.jsonl up to step
100) with the runtime choices that computed them (steps per call, the convolutions' forms, the
XLA:CPU kernels, the seed mode). tests/test_rows.py trains those steps again with today's code: when a
change to the recipe, the data order or the initialisation moves them, it fails and says to
re-run the row, and whoever re-runs a row records it again.
"""

import argparse
import json
from pathlib import Path

from mnist_jax import checkpoint, metrics, seeds

ROWS = Path(__file__).resolve().parents[1] / "docs" / "rows"
FIRST_STEPS = 100


def record(stage: str, workdir: Path, wall: float) -> dict:
    """The record of the --seeds run in `workdir` (its seeds.json, seed_<first>/'s files)."""
    summary = json.loads((workdir / "seeds.json").read_text())
    first = checkpoint.seed_dir(workdir, summary["seeds"][0])
    config = json.loads((first / "config.json").read_text())
    runtime = metrics.read(first / "config_history.jsonl")[0]["runtime"]
    return {
        "stage": stage,
        "command": f"python -m experiments.{stage} --seeds {len(summary['seeds'])} --data-dir ../shared/data/mnist",  # fmt: skip
        "seeds": summary["seeds"],
        "test_accuracy": summary["test_accuracy"],
        "final": [r["test_accuracy"] for r in summary["runs"]],
        "wall_s": wall,
        "runtime": {"xla_cpu": config["xla_cpu"], **runtime},  # runs before the runtime recorded it: the config's
        "first_steps": [
            {"step": r["step"], "loss": r["loss"]}
            for r in metrics.read(first / metrics.STEPS_FILE)
            if r["step"] <= FIRST_STEPS
        ],
    }


def line(rec: dict) -> str:
    """The README table's figure columns for a record."""
    f = {k: 100 * v for k, v in rec["test_accuracy"].items()}
    return (
        f"| `{rec['stage']}` | {f['median']:.2f}% | {f['mean']:.2f}% +- {f['std']:.2f}% "
        f"({f['min']:.2f} to {f['max']:.2f}) | {rec['wall_s']:.0f} s |"
    )


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.rows", description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("stage", nargs="?", help="record this stage's row from its --seeds run")
    p.add_argument("--workdir", help="the run (default runs/<stage>)")
    p.add_argument("--wall", type=float, help="the command's wall time, seconds (measure it)")
    args = p.parse_args(argv)
    if args.stage is None:
        for path in sorted(ROWS.glob("*.json")):
            print(line(json.loads(path.read_text())))
        return
    if args.wall is None:
        p.error("--wall: the command's wall time is part of the row")
    rec = record(args.stage, Path(args.workdir or f"runs/{args.stage}"), args.wall)
    ROWS.mkdir(parents=True, exist_ok=True)
    (ROWS / f"{args.stage}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(seeds.summary_line({"stage": args.stage, "mode": rec["runtime"]["seed_mode"], "seeds": rec["seeds"], **rec}))  # fmt: skip
    print(line(rec))


if __name__ == "__main__":
    main()
