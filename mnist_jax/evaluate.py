"""Evaluate a checkpoint on the test set: `python -m mnist_jax.evaluate --workdir DIR`.

Restores only the model variables (no optimizer state), prints accuracy, loss and how many ReLU
units of each hidden layer are dead (0 on every test image), and writes WORKDIR/eval.json. The
accuracy equals the test_accuracy logged for that epoch: same data, same `train.eval_dataset`.
"""

import json
import sys
from pathlib import Path

import jax

from mnist_jax import checkpoint, data, diagnostics, flags, recipe, startup, train
from mnist_jax.config import ConfigError


def restore(workdir: str | Path, step: int | None = None) -> checkpoint.Restored:
    """checkpoint.restore, where a checkpoint that Orbax fails to read (a flipped bit in its
    array metadata) is a FileNotFoundError in one line, as the damage it screens for is."""
    startup.quiet_orbax()  # the reads a failed restore leaves behind
    try:
        return checkpoint.restore(workdir, step)
    except (FileNotFoundError, ConfigError):
        raise
    except Exception as e:  # Orbax and tensorstore raise many types for damaged files
        if isinstance(e, checkpoint.BUGS):
            raise
        where = Path(workdir) / "checkpoints" / (str(step) if step is not None else "")
        raise FileNotFoundError(f"{where}: damaged checkpoint ({checkpoint.reason(e)})") from None


def test_data(restored: checkpoint.Restored, data_dir: str | None = None):
    """(test images, labels) of a restored run (from `data_dir` when given, else the run's
    data); DataError in one line when their images are not shaped like the run's."""
    config = restored.config
    ds = data.load(data_dir) if data_dir else data.from_config(config.data)
    shape, num_classes, _ = data.spec(config)
    found = tuple(ds.test_images.shape[1:])
    where = f"--data-dir {data_dir}" if data_dir else f"the run's data ({ds.source})"
    if found != tuple(shape):
        show = lambda s: "x".join(map(str, s))  # noqa: E731
        raise data.DataError(
            f"{where}: images are {show(found)}, the run was trained on {show(shape)}: the shapes differ"
        )
    if ds.num_classes > num_classes:
        raise data.DataError(f"{where}: {ds.num_classes} classes, the run was trained on {num_classes}")
    recorded = config.get("dataset") or {}
    ours = data.identity(ds) if recorded.get("sha256") else recorded
    if ours.get("sha256") != recorded.get("sha256"):  # the same shape, other images or labels
        what = f"{ds.source}, sha256 {ours['sha256'][:12]}; the run trained on {recorded.get('source')}, sha256 {recorded['sha256'][:12]}"
        if not data_dir:
            raise data.DataError(
                f"{where}: not the data the run trained on ({what}); point MNIST_DATA_DIR at those, or pass --data-dir DIR to evaluate it on these"
            )
        print(f"note: --data-dir {data_dir}: not the data the run trained on ({what})", file=sys.stderr)
    limit = config.data.test_limit or None
    return ds.test_images[:limit], ds.test_labels[:limit]


def evaluate_restored(restored: checkpoint.Restored, test: tuple) -> dict:
    """`train.eval_dataset` of a restored run on `test`: (images, labels)."""
    state = train.inference_state(restored.model, restored.variables)
    return train.eval_dataset(state, *jax.device_put(test))


def evaluate_checkpoint(workdir: str | Path, data_dir: str | None = None, step: int | None = None):
    """Metrics of checkpoint `step` (default latest) on the run's test images."""
    restored = restore(workdir, step)
    test_x, test_y = test_data(restored, data_dir)
    out = evaluate_restored(restored, (test_x, test_y))
    return {
        "step": restored.step,
        "accuracy": float(out["accuracy"]),
        "loss": float(out["loss"]),
        "num_examples": len(test_y),
        # {hidden layer: [dead, units]}
        "dead_units": diagnostics.dead_counts(out["alive"]),  # counted in the same pass
        "activation": restored.config.model.get("activation", "relu"),  # what "dead" means
        "weights": restored.weights,
    }


def main(argv=None):
    parser = flags.Parser(prog="python -m mnist_jax.evaluate", description=__doc__.splitlines()[0])
    flags.add(parser, "workdir", "data_dir", "step")
    args = parser.parse_args(argv)
    with flags.user_errors(FileNotFoundError, ConfigError, data.DataError):
        # eval.json goes in the work directory
        recipe.check_workdir(args.workdir, writes=("",), uses=("checkpoints", "eval.json"))
        result = evaluate_checkpoint(args.workdir, args.data_dir, args.step)
    print(
        f"step {result['step']}: test accuracy {result['accuracy']:.2%}"
        f" ({result['num_examples']} images), loss {result['loss']:.4f}; {result['weights']}"
    )
    if result["dead_units"]:
        dead = diagnostics.format_dead(result["dead_units"])
        print(f"{diagnostics.dead_what(result['activation'])}: {dead}")
    path = Path(args.workdir) / "eval.json"
    try:
        flags.write_atomic(path, json.dumps(result, indent=2) + "\n")
    except OSError as e:  # a full disk, say: the results above are printed all the same
        flags.fail(f"{path}: cannot write ({e.strerror})")


if __name__ == "__main__":
    main()
