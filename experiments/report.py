"""Results of all stages in one table and one figure, read from their work directories.

  python -m experiments.report [--runs DIR]     # writes DIR/report.md, DIR/report.png

Reads only RUNS/<stage>/config.json and metrics.jsonl, so it works on finished, interrupted or
old runs. The README's results table comes from it.
"""

import json
from pathlib import Path

import jax
import ml_collections

from mnist_jax import flags, metrics, train

STAGES = [
    "linear",
    "dense_sigmoid",
    "dense_relu",
    "dense_fast_lr",
    "dense_lr_decay",
    "dense_deep",
    "dense_dropout",
    "conv",
    "conv_dropout",
    "conv_bn",
    "conv_best",  # beyond the codelab (issue #45)
]


def collect(runs: Path) -> list[dict]:
    """One summary per stage work directory under `runs`, in the codelab's order."""
    found = [d for d in sorted(runs.iterdir()) if (d / "metrics.jsonl").exists()]
    order = {name: i for i, name in enumerate(STAGES)}
    found.sort(key=lambda d: (order.get(d.name, len(STAGES)), d.name))
    results = []
    for d in found:
        rows = metrics.read(d / "metrics.jsonl")
        if not rows:
            continue
        config = ml_collections.ConfigDict(json.loads((d / "config.json").read_text()))
        state = jax.eval_shape(lambda: train.create_train_state(config, jax.random.PRNGKey(0)))
        best = max(rows, key=lambda r: r["val_accuracy"]) if "val_accuracy" in rows[-1] else None
        results.append(
            {
                "stage": d.name,
                "params": sum(x.size for x in jax.tree.leaves(state.params)),
                "epochs": rows[-1]["epoch"],
                "final": rows[-1]["test_accuracy"],
                # Chosen on the validation split; a run without one has no best epoch.
                "best": best and best["test_accuracy"],
                "best_epoch": best and best["epoch"],
                "seconds": sum(r["seconds"] for r in rows),
            }
        )
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| stage | params | epochs | final test acc | test acc at the best validation epoch | time |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        best = f"{r['best']:.2%} ({r['best_epoch']})" if r["best"] is not None else "no validation split"  # fmt: skip
        lines.append(
            f"| `{r['stage']}` | {r['params']:,} | {r['epochs']} | {r['final']:.2%} | {best} | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def figure(results: list[dict], out: Path) -> None:
    """Test error (log scale: 25% to 0.5% is the story) and training time per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["stage"] for r in results]
    x = range(len(results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    ax1.bar([i - 0.2 for i in x], [100 * (1 - r["final"]) for r in results], 0.4, label="final epoch")
    best = [100 * (1 - (r["best"] if r["best"] is not None else r["final"])) for r in results]
    ax1.bar([i + 0.2 for i in x], best, 0.4, label="best validation epoch (else final)")
    for i, r in enumerate(results):
        top = 100 * (1 - r["final"])
        ax1.text(i, top * 1.08, f"{r['final']:.2%}", ha="center", va="bottom", fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("test error, % (log scale)")
    ax1.set_title("Test error per stage (label: final accuracy)")
    ax1.legend()
    ax2.bar(list(x), [r["seconds"] for r in results], color="#7f7f7f")
    ax2.set_ylabel("seconds")
    ax2.set_title("Training time (epochs + evaluation)")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = flags.Parser(prog="python -m experiments.report", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder of stage work directories")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    if not runs.is_dir():
        flags.fail(f"--runs {runs}: directory not found")
    results = collect(runs)
    if not results:
        flags.fail(f"--runs {runs}: no work directory with a metrics.jsonl in it")
    text = table(results)
    (runs / "report.md").write_text(text)
    figure(results, runs / "report.png")
    print(text, end="")
    print(f"Wrote {runs / 'report.md'} and {runs / 'report.png'}")


if __name__ == "__main__":
    main()
