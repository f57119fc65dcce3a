"""Seed study: a stage trained with several seeds; each seed's result, the mean and the spread.

A seed is one draw of initial weights, data order and dropout masks. On MNIST a stage's final
test accuracy moves by a few tenths of a percent from seed to seed: as much as many changes a
researcher wants to measure, so compare means over seeds, not single runs.

  python -m experiments.seeds conv --seeds 10 --data-dir ../shared/data/mnist
  python -m experiments.seeds conv --seeds 10 --framework keras     # the recipe in Keras 3

A report over the stage's own `--seeds` run (mnist_jax/seeds.py): `python -m experiments.conv
--seeds 10 --workdir runs/seeds/conv` trains the same, each seed checkpointed in
WORKDIR/seed_<s>/ (so an interrupted study resumes), evaluated on all 10,000 test images after
every epoch. `--framework keras` trains the stage's model and recipe with Keras 3's `fit`
(experiments.references.keras_train): the reference for whether this port trains as well as the
codelab's own code. The target is the stage's TARGET (final test accuracy), or --target.
Results go to --json, by default runs/seeds_<stage>.json (runs/seeds_<stage>_keras.json).

Each seed's line also says if the run collapsed (one class predicted for every test image, as
about 1 conv run in 8 does) and how many ReLU units of each hidden layer are 0 on every test image
(diagnostics.dead_units; references.keras_dead_units for Keras runs). The summary adds the median
and, apart, the mean and spread of the runs that did not collapse.
"""

import importlib
import importlib.util
import statistics

import ml_collections

from experiments import references
from mnist_jax import diagnostics, flags, loop, startup
from mnist_jax import seeds as mnist_seeds
from mnist_jax.config import ConfigError
from mnist_jax.data import DataError

FRAMEWORKS = ("mnist_jax", "keras")


def study(get_config, name: str, seeds, epochs=None, target=None, framework="mnist_jax",
          data_dir=None, train_limit=0, workdir=None, restart=False, val_split=0) -> dict:  # fmt: skip
    """Train `get_config()` with seeds `seeds` (a range); print a line per seed; return every
    run and the summary. mnist_jax: one `--seeds` run (mnist_jax.seeds) in `workdir`. With
    val_split, each seed's best epoch is chosen on that validation split."""
    config = get_config()
    config.name, config.seed, config.seeds = name, seeds[0], len(seeds)
    if epochs is not None:
        config.epochs = epochs
    config.data.train_limit, config.restart, config.data.val_split = train_limit, restart, val_split  # fmt: skip
    if data_dir:
        config.data.dir = str(data_dir)
    startup.start(config)  # validates it, and sets up this process
    if framework == "keras":
        runs = []
        for seed in seeds:
            c = ml_collections.ConfigDict(config.to_dict())
            c.seed, c.seeds = seed, 1
            runs.append(references.keras_train(c, data_dir))
    else:
        workdir = workdir or f"runs/seeds/{name}"
        runs = mnist_seeds.train(config, workdir, dead_units=True, report=False)["runs"]
    for r in runs:
        line = f"{mnist_seeds.seed_line(r)}, {r['epochs']} epochs in {r['seconds']:.1f}s"
        if r["collapsed_to"] is not None:
            line += f"; collapsed: predicts class {r['collapsed_to']} for every test image"
        if r.get("dead_units"):  # none in the one-layer softmax
            line += f"; dead units: {diagnostics.format_dead(r['dead_units'])}"
        if target:  # a report of the test curve, not a choice
            first = next((h["epoch"] for h in r["history"] if h["test_accuracy"] >= target), None)
            line += f"; test {target:.2%} first at epoch {first}" if first else f"; test {target:.2%} not reached"  # fmt: skip
        print(line, flush=True)
    final = [r["test_accuracy"] for r in runs]
    # A collapsed run (one class for every image) drags a mean down by 9 points: the median, and
    # the mean and spread of the others, say more of what the recipe usually gives.
    kept = [r["test_accuracy"] for r in runs if r["collapsed_to"] is None]
    summary = {
        "stage": name,
        "framework": framework,
        "seeds": list(seeds),
        "epochs": runs[0]["epochs"],
        "target": target,
        "mean_accuracy": statistics.mean(final),  # final test accuracy, as every *_accuracy here
        "std_accuracy": statistics.stdev(final) if len(final) > 1 else 0.0,
        "median_accuracy": statistics.median(final),
        "collapsed": len(final) - len(kept),
        "mean_accuracy_not_collapsed": statistics.mean(kept) if kept else None,
        "std_accuracy_not_collapsed": statistics.stdev(kept) if len(kept) > 1 else None,
        "min_accuracy": min(final),
        "max_accuracy": max(final),
        "reached": sum(a >= target for a in final) if target else None,
        "mean_seconds": statistics.mean(r["seconds"] for r in runs),
        "runs": runs,
    }
    s = summary
    line = (f"{name} ({framework}) over {len(runs)} seeds: final test {s['mean_accuracy']:.2%} mean, "
            f"{s['std_accuracy']:.2%} std, {s['min_accuracy']:.2%} to {s['max_accuracy']:.2%}")  # fmt: skip
    line += f"; median {s['median_accuracy']:.2%}"
    if all(r.get("best_test_accuracy") is not None for r in runs):  # chosen on validation
        best = [r["best_test_accuracy"] for r in runs]
        s["median_best_test_accuracy"] = statistics.median(best)
        line += f"; test at the best validation epoch {s['median_best_test_accuracy']:.2%} median"
    if s["collapsed"]:
        line += f"; {s['collapsed']} collapsed"
        if kept:
            line += f", the others {s['mean_accuracy_not_collapsed']:.2%} mean"
    if target:
        line += f"; {s['reached']} of {len(runs)} final at or above {target:.2%}"
    print(line + f"; {s['mean_seconds']:.1f}s each")
    return summary


def run_study(*args) -> dict:
    """study(*args), its failures as the stage command's: one line and its exit status."""
    try:
        with flags.user_errors(ConfigError, DataError):
            return study(*args)
    except loop.Diverged as e:
        flags.fail(str(e), flags.EXIT_DIVERGED)
    except loop.Interrupted as e:
        flags.fail(str(e), e.exit_code)


def main(argv=None):
    p = flags.Parser(prog="python -m experiments.seeds", description=__doc__.splitlines()[0])
    p.add_argument("stage", help="a module in experiments/, e.g. conv")
    flags.add(p, "seeds")
    p.add_argument("--first-seed", type=int, default=0, help="seeds start here (default 0)")
    flags.add(p, "epochs")
    p.add_argument("--target", type=float, default=0.0, help="a final test accuracy; each seed's line says when it first reached it (default: the stage's TARGET)")  # fmt: skip
    p.add_argument("--framework", choices=FRAMEWORKS, default="mnist_jax",
                   help="train with this port, or the stage's recipe in Keras 3 (default %(default)s)")  # fmt: skip
    json_help = "where to write the results (default runs/seeds_<stage>[_keras].json)"
    flags.add(p, "data_dir", "train_limit", json={"help": json_help})
    p.add_argument("--workdir", default="", help="the runs' work directory, seed_<s>/ in it (default runs/seeds/<stage>)")  # fmt: skip
    flags.add(p, "restart", "val_split")
    args = p.parse_args(argv)
    try:
        stage = importlib.import_module(f"experiments.{args.stage}")
        stage.get_config
    except (ImportError, AttributeError):
        p.error(f"stage: no stage named {args.stage!r} in experiments/")
    if args.seeds < 1:
        p.error(f"--seeds: must be at least 1, got {args.seeds}")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs: must be at least 1, got {args.epochs}")
    if args.train_limit < 0:
        p.error(f"--train-limit: must be 0 (all) or positive, got {args.train_limit}")
    if not 0 <= args.target <= 1:
        p.error(f"--target: a test accuracy in (0, 1], got {args.target}")
    if args.framework == "keras" and importlib.util.find_spec("keras") is None:
        p.error("--framework keras: keras is not installed (pip install -e '.[bench]')")
    target = args.target or getattr(stage, "TARGET", None)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    summary = run_study(stage.get_config, args.stage, seeds, args.epochs, target,
                        args.framework, args.data_dir, args.train_limit, args.workdir,
                        args.restart, args.val_split)  # fmt: skip
    suffix = "_keras" if args.framework == "keras" else ""
    flags.write_json(args.json or f"runs/seeds_{args.stage}{suffix}.json", summary)


if __name__ == "__main__":
    main()
