"""Results of all stages in one markdown table, read from their work directories.

  python -m experiments.report [--runs DIR]     # writes DIR/report.md and prints it

Reads only RUNS/<stage>/config.json and metrics.jsonl, so it works on finished, interrupted or
old runs. The README's results table comes from it.
"""

import json
from pathlib import Path

import jax
import ml_collections

from mnist_jax import cli, metrics, train

STAGES = ["linear", "dense_sigmoid", "dense_relu", "dense_lr_decay", "dense_dropout",
          "conv", "conv_dropout", "conv_bn"]


def table(runs: Path) -> str:
    found = [d for d in sorted(runs.iterdir()) if (d / "metrics.jsonl").exists()]
    order = {name: i for i, name in enumerate(STAGES)}
    found.sort(key=lambda d: (order.get(d.name, len(STAGES)), d.name))
    lines = ["| stage | params | epochs | final test acc | best test acc (epoch) | time |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for d in found:
        rows = metrics.read(d / "metrics.jsonl")
        if not rows:
            continue
        config = ml_collections.ConfigDict(json.loads((d / "config.json").read_text()))
        state = jax.eval_shape(lambda: train.create_train_state(config, jax.random.PRNGKey(0)))
        params = sum(x.size for x in jax.tree.leaves(state.params))
        best = max(rows, key=lambda r: r["val_accuracy"])
        seconds = sum(r["seconds"] for r in rows)
        lines.append(
            f"| `{d.name}` | {params:,} | {rows[-1]['epoch']} | {rows[-1]['val_accuracy']:.2%} "
            f"| {best['val_accuracy']:.2%} ({best['epoch']}) | {seconds:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = cli.Parser(prog="python -m experiments.report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder of stage work directories")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    if not runs.is_dir():
        cli.fail(f"--runs {runs}: directory not found")
    text = table(runs)
    (runs / "report.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
