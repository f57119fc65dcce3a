"""Speedrun: 99.5% test accuracy in the least wall time; five seeds, every one reported.

Changed from conv_bn: the same network (the codelab's best), trained 6 epochs instead of 10,
with a one-cycle schedule (Adam, warm up to 0.01 over the first 20% of the steps, then cosine
down to 0.01/1000) in place of the per-epoch exponential decay, and each training image shifted
randomly by up to 2 pixels (on the device, inside the jitted step). Each seed trains the fixed
budget and is evaluated on all 10,000 test images after each epoch; the time counts training
and evaluation, compilation apart.

What got here (2-core CPU, final test accuracy):
  - one-cycle, 3 epochs, no shifts: seeds 0, 1: 99.44%, 99.39% (about 125 s each);
  - one-cycle, 5 epochs, no shifts: seeds 0, 1, 2: 99.52%, 99.47%, 99.38% (about 200 s);
  - one-cycle, 6 epochs, shifts of up to 2 pixels: seed 2: 99.59% (247 s): kept.

  python -m experiments.speedrun --data-dir ../shared/data/mnist            # 5 seeds
  python -m experiments.speedrun --seeds 1 --epochs 2                       # a quick try

Measured: docs/performance.md has the figures of the last 5-seed run.
"""

from experiments import conv_bn, seeds
from mnist_jax import flags

TARGET = 0.995


def get_config():
    config = conv_bn.get_config()
    config.epochs = 6
    config.data.augment_shift = 2
    config.opt.update(name="adam", lr=0.01, schedule="onecycle")
    return config


def main(argv=None):
    p = flags.Parser(prog="python -m experiments.speedrun", description=__doc__.splitlines()[0])
    flags.add(p, "seeds", "epochs", "data_dir", "train_limit", json="runs/speedrun.json")
    p.add_argument("--workdir", default="runs/speedrun", help="default %(default)s (seed_<s>/)")
    flags.add(p, "restart", "val_split")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds: must be at least 1, got {args.seeds}")
    summary = seeds.run_study(get_config, "speedrun", range(args.seeds), args.epochs, TARGET,
                              "mnist_jax", args.data_dir, args.train_limit, args.workdir,
                              args.restart, args.val_split)  # fmt: skip
    summary["goal_seconds"] = 60
    verdict = "meets" if summary["mean_accuracy"] >= TARGET else "misses"
    print(f"mean over {args.seeds} seeds: {summary['mean_accuracy']:.2%} ({verdict} 99.5%), "
          f"{summary['mean_seconds']:.1f}s each (goal 60s, compilation apart)")  # fmt: skip
    flags.write_json(args.json, summary)


if __name__ == "__main__":
    main()
