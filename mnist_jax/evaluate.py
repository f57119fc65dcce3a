"""Evaluate a checkpoint on the test set: `python -m mnist_jax.evaluate --workdir DIR`.

Restores only the model variables (no optimizer state), prints accuracy, loss and how many ReLU
units of each hidden layer are dead (0 on every test image), and writes WORKDIR/eval.json. The
accuracy equals the test_accuracy logged for that epoch: same data, same `train.eval_dataset`.
"""

import json
from pathlib import Path

import jax

from mnist_jax import checkpoint, data, diagnostics, flags, train
from mnist_jax.config import ConfigError


def evaluate_restored(restored: checkpoint.Restored, data_dir: str | None = None):
    """(test images, labels, `train.eval_dataset` output) of a restored run on its test images
    (from `data_dir` when given, else the run's data)."""
    config = restored.config
    ds = data.load(data_dir) if data_dir else data.from_config(config.data)
    limit = config.data.test_limit or None
    test_x, test_y = ds.test_images[:limit], ds.test_labels[:limit]
    out = train.eval_dataset(train.inference_state(restored), *jax.device_put((test_x, test_y)))
    return test_x, test_y, out


def evaluate_checkpoint(workdir: str | Path, data_dir: str | None = None, step: int | None = None):
    """Metrics of checkpoint `step` (default latest) on the run's test images."""
    restored = checkpoint.restore(workdir, step)
    test_x, test_y, out = evaluate_restored(restored, data_dir)
    return {
        "step": restored.step,
        "accuracy": float(out["accuracy"]),
        "loss": float(out["loss"]),
        "num_examples": len(test_y),
        # {hidden layer: [dead, units]}
        "dead_units": diagnostics.dead_counts(out["alive"]),  # counted in the same pass
        "activation": restored.config.model.get("activation", "relu"),  # what "dead" means
    }


def main(argv=None):
    parser = flags.Parser(prog="python -m mnist_jax.evaluate", description=__doc__.splitlines()[0])
    flags.add(parser, "workdir", "data_dir", "step")
    args = parser.parse_args(argv)
    with flags.user_errors(FileNotFoundError, ConfigError, data.DataError):
        result = evaluate_checkpoint(args.workdir, args.data_dir, args.step)
    print(
        f"step {result['step']}: test accuracy {result['accuracy']:.2%}"
        f" ({result['num_examples']} images), loss {result['loss']:.4f}"
    )
    if result["dead_units"]:
        dead = diagnostics.format_dead(result["dead_units"])
        print(f"{diagnostics.dead_what(result['activation'])}: {dead}")
    flags.write_atomic(Path(args.workdir) / "eval.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
