"""What each augmentation costs a conv_bn training step: `python -m experiments.augment_cost`.

The loop's compiled call (experiments/timing.py, as the benchmark times it) with none, the shift,
each part of the warp alone and all of them, measured in turn in one process; images/s is the
median over the timed windows (noise here only slows a window). Results: docs/performance.md.
"""

import argparse
import os

from experiments import conv_bn, timing

SETTINGS = {
    "none": {},
    "shift 2": dict(augment_shift=2),
    "rotate 15": dict(augment_rotate=15.0),
    "scale 0.1": dict(augment_scale=0.1),
    "shear 10": dict(augment_shear=10.0),
    "elastic 20, sigma 4": dict(augment_elastic=20.0),
    "all of them": dict(
        augment_shift=2, augment_rotate=15.0, augment_scale=0.1, augment_shear=10.0, augment_elastic=20.0
    ),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.augment_cost", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST's IDX files (default: $MNIST_DATA_DIR)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128, conv_bn's)")
    parser.add_argument(
        "--windows", type=int, default=5, help="timed windows of 40 steps, their median reported (default: 5)"
    )
    args = parser.parse_args(argv)
    base = None
    print("| augmentation | images/s | step ms | x none |\n| --- | ---: | ---: | ---: |")
    for name, data in SETTINGS.items():
        config = conv_bn.get_config()
        config.batch_size = args.batch_size
        config.data.update(**data)
        r = timing.measure_ours(config, args.data_dir, windows=args.windows, window_images=40 * args.batch_size)
        base = base or r["images_per_s"]
        ms = 1000 * args.batch_size / r["images_per_s"]
        print(f"| {name} | {r['images_per_s']:,.0f} | {ms:.1f} | {base / r['images_per_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
