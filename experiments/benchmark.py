"""Benchmark: conv_bn training speed against Keras 3 (JAX backend) and PyTorch; time to accuracy.

  python -m experiments.benchmark --data-dir ../shared/data/mnist            # speed table
  python -m experiments.benchmark --time-to-accuracy conv_bn --target 0.99   # one stage
  python -m experiments.benchmark --seeds 4    # adds 4 seeds vmapped: models x images/s

Speed: the codelab's conv_bn recipe at each --batch-sizes, each framework in its own process:
compile (first step) apart, then the median images/s over --windows timed windows, seconds per
epoch and peak memory; then ours/theirs ratios. Keras and PyTorch come from the `bench` extra
(`pip install -e '.[bench]'`); a missing one is skipped with a message. Results go to --json.

What was tried for our side, conv_bn at batch 64 on the 2-core CPU (ms per step, median of
alternating windows in one process; the machine's figures wander by about 10%):
  - plain Flax convolutions: 40-46 ms. Per layer, the input gradient of the 6x6 stride-2 conv
    took 17.9 ms of it: XLA:CPU runs a transposed strided convolution slowly.
  - that gradient as a stride-1 convolution over space-to-depth images (models.conv_stride2):
    28-33 ms. Kept. The same trick for the forward and kernel gradient was slower (+1 to +3 ms).
  - im2col + matmul convolutions: slower (30 ms for one layer's forward alone).
  - a lax.scan over the epoch's steps: 460 ms/step against 51, XLA:CPU's loop-body convolutions
    (jax-ml/jax#12868); so no loop: data on the device, metrics fetched every 50 steps.
  - 8 steps a call unrolled against one: 1.05-1.07x; the CPU's default for a conv net's run of
    2,000 steps or more (--steps-per-call 1: one a call). Dense nets were slower so: one a call.
  - XLA flags (oneDNN, XNNPACK, YNNPACK fusions, fast math, the old runtime, no fusion
    emitters): convolutions kept from YNNPACK 1.2x (the CPU's default, --xla-cpu ynn-no-conv;
    the rest within the noise); single-threaded Eigen: 20% slower.
  - bfloat16 (--dtype): slower; XLA:CPU has no bf16 kernels here (PyTorch's reach 425 GFLOP/s).
  - conv1's forward as shifted multiply-adds: 1.10x the step (the CPU's default, --conv-grad shifts).
  - conv2's input gradient as matmul + col2im: 2x slower than the space-to-depth path.
Where the time goes, each operation against PyTorch's: `python -m experiments.profile_ops`
(docs/performance.md); the cores' float32 matmul peak is 190-207 GFLOP/s.
"""

import argparse
import importlib
import importlib.util
import json
import platform
import subprocess
import sys

from experiments import conv_bn, references, timing
from mnist_jax import flags, startup
from mnist_jax.config import CONV_GRADS, XLA_CPUS, ConfigError
from mnist_jax.data import DataError

FRAMEWORKS = ("mnist_jax", "keras", "pytorch")
NEEDS = {"keras": "keras", "pytorch": "torch"}
EXIT_MISSING = 4


def parse_args(argv=None):
    p = flags.Parser(prog="python -m experiments.benchmark", description=__doc__.splitlines()[0])
    flags.add(p, "data_dir")
    p.add_argument("--batch-sizes", default="64,1024", help="comma-separated (default 64,1024)")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="subset of " + ",".join(FRAMEWORKS))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="what our convolutions and matmuls compute in (default float32)")  # fmt: skip
    p.add_argument("--conv-grad", choices=CONV_GRADS, default="auto",
                   help="our convolutions' forms (the stages' --conv-grad; default auto)")  # fmt: skip
    p.add_argument("--xla-cpu", choices=XLA_CPUS, default="auto",
                   help="our XLA:CPU kernels (the stages' --xla-cpu; default auto)")  # fmt: skip
    p.add_argument("--steps-per-call", type=int, default=0,
                   help="our steps per compiled call (the stages' --steps-per-call; default 0, per backend)")  # fmt: skip
    p.add_argument("--windows", type=int, default=5, help="timed windows per run (default 5)")
    p.add_argument("--window-images", type=int, default=6400, help="images per window (default 6400)")
    flags.add(p, json="runs/benchmark.json")
    p.add_argument("--time-to-accuracy", metavar="STAGE", help="instead: time STAGE to --target")
    p.add_argument("--target", type=float, default=0.99, help="validation accuracy (default 0.99)")
    flags.add(p, val_split={"default": 5000, "help": "training images held out to stop on (default 5000)"})  # fmt: skip
    p.add_argument("--max-epochs", type=int, default=20, help="give up after (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="also time N seeds in one vmapped program (models x images/s)")  # fmt: skip
    p.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes: expected integers like 64,1024, got {args.batch_sizes!r}")
    args.frameworks = [f for f in args.frameworks.split(",") if f.strip()]
    for name in args.frameworks:
        if name not in FRAMEWORKS:
            p.error(f"--frameworks: unknown {name!r}; choose from {', '.join(FRAMEWORKS)}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or max(args.batch_sizes) > 60_000:
        p.error(f"--batch-sizes: each must be in 1..60000, got {args.batch_sizes}")
    if args.windows < 1 or args.window_images < 1:
        p.error("--windows and --window-images must be at least 1")
    if args.seeds < 1:
        p.error(f"--seeds: must be at least 1, got {args.seeds}")
    if not 0 < args.target <= 1:
        p.error(f"--target: a validation accuracy in (0, 1], got {args.target}")
    return args


def worker(args) -> None:
    """Run one framework at one batch size; print its result as the last line of stdout."""
    if args.worker in NEEDS and importlib.util.find_spec(NEEDS[args.worker]) is None:
        print(f"{args.worker}: skipped, {NEEDS[args.worker]} is not installed "
              "(pip install -e '.[bench]')")  # fmt: skip
        raise SystemExit(EXIT_MISSING)
    data_dir = args.data_dir or None
    config = conv_bn.get_config()
    config.batch_size, config.seed, config.dtype, config.conv_grad = args.batch, args.seed, args.dtype, args.conv_grad
    config.xla_cpu, config.steps_per_call = args.xla_cpu, args.steps_per_call
    if args.worker == "mnist_jax":
        startup.set_xla_cpu(config)
        result = timing.measure_ours(config, data_dir, args.windows, args.window_images, args.seeds)
    elif args.worker == "keras":
        result = references.measure_keras(config, data_dir, args.windows, args.window_images)
    else:
        result = references.measure_torch(args.batch, data_dir, args.windows, args.window_images)
    print(json.dumps(result))


def run_worker(args, name: str, batch: int, seeds: int = 1) -> dict | str:
    """A result dict, or the line that says why there is none."""
    cmd = [sys.executable, "-m", "experiments.benchmark", "--worker", name, "--batch", str(batch),
           "--windows", str(args.windows), "--window-images", str(args.window_images),
           "--seed", str(args.seed), "--seeds", str(seeds), "--dtype", args.dtype,
           "--conv-grad", args.conv_grad, "--xla-cpu", args.xla_cpu,
           "--steps-per-call", str(args.steps_per_call)] + (["--data-dir", args.data_dir] if args.data_dir else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == EXIT_MISSING:
        return lines[-1]
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{name}: failed at batch {batch} (exit {proc.returncode}): {err}"
    return json.loads(lines[-1])


def speed(args) -> dict:
    results, skipped = [], []
    print(f"{'framework':<11}{'batch':>6}{'compile s':>11}{'img/s':>9}{'s/epoch':>9}{'peak MiB':>10}  version")
    for batch in args.batch_sizes:
        runs = [(name, 1) for name in args.frameworks]
        if args.seeds > 1 and "mnist_jax" in args.frameworks:
            runs.append(("mnist_jax", args.seeds))
        for name, n in runs:
            r = run_worker(args, name, batch, n)
            if isinstance(r, str):
                print(r)
                skipped.append(r)
                continue
            results.append(r)
            print(f"{r['framework']:<11}{batch:>6}{r['first_step_s']:>11.2f}{r['images_per_s']:>9.0f}"
                  f"{r['epoch_s']:>9.1f}{r['peak_rss_mib']:>10.0f}  {r['version']}", flush=True)  # fmt: skip
    ratios = {}
    for r in results:
        ours = next((o for o in results if o["framework"] == "mnist_jax" and o["batch_size"] == r["batch_size"]), None)  # fmt: skip
        if ours and r is not ours and not r["framework"].startswith("mnist_jax"):
            key = f"mnist_jax/{r['framework']}@{r['batch_size']}"
            ratios[key] = round(ours["images_per_s"] / r["images_per_s"], 2)
            print(f"images/s {key}: {ratios[key]:.2f}x")
    for r in results:
        if r.get("seeds", 1) > 1 and ours_by_batch(results, r["batch_size"]):
            key = f"{r['framework']}/mnist_jax@{r['batch_size']}"
            ratios[key] = round(r["images_per_s"] / ours_by_batch(results, r["batch_size"])["images_per_s"], 2)  # fmt: skip
            print(f"models x images/s {key}: {ratios[key]:.2f}x")
    return {"results": results, "ratios": ratios, "skipped": skipped}


def ours_by_batch(results, batch):
    return next((o for o in results if o["framework"] == "mnist_jax" and o["batch_size"] == batch), None)  # fmt: skip


def time_to_accuracy(args) -> dict:
    try:
        stage = importlib.import_module(f"experiments.{args.time_to_accuracy}")
        config = stage.get_config()
    except (ImportError, AttributeError):
        flags.fail(f"--time-to-accuracy: no stage named {args.time_to_accuracy!r} in experiments/")
    config.name, config.seed = args.time_to_accuracy, args.seed
    with flags.user_errors(ConfigError, DataError):
        startup.start(config)
        r = timing.time_to_accuracy(config, args.target, args.max_epochs, args.data_dir, val_split=args.val_split)  # fmt: skip
    for h in r["history"]:
        print(f"epoch {h['epoch']:3d}  val_acc {h['val_accuracy']:.2%}  test_acc {h['test_accuracy']:.2%}  {h['seconds']:.1f}s")  # fmt: skip
    verdict = "reached" if r["reached"] else f"not reached in {r['epochs']} epochs"
    print(f"{r['stage']} seed {r['seed']}: validation {args.target:.2%} {verdict}: {r['seconds']:.1f}s "
          f"(training + evaluation), compile {r['compile_s']:.1f}s apart; test {r['test_accuracy']:.2%}")  # fmt: skip
    return r


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    out = time_to_accuracy(args) if args.time_to_accuracy else speed(args)
    out["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                      "python": platform.python_version()}  # fmt: skip
    flags.write_json(args.json, out)


if __name__ == "__main__":
    main()
