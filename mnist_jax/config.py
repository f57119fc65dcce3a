"""The shared base config. Each stage in `experiments/` overrides what changes.

A config is an `ml_collections.ConfigDict`: attribute access, type-checked assignment, JSON out.
Every leaf becomes a command-line flag (see `flags.py`): `data.dir` -> `--data-dir`.
"""

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot be trained with. The message names the flag."""


MODELS = ("softmax", "mlp", "conv")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("exponential", "onecycle")


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"  # the stage; default work directory is runs/<name>
    c.workdir = ""  # "" -> runs/<name>
    c.seed = 0
    c.epochs = 10
    c.batch_size = 128
    c.data = ml_collections.ConfigDict(
        dict(
            dir="",  # IDX directory; "" -> $MNIST_DATA_DIR, else TFDS "mnist"
            train_limit=0,  # use only the first N training images (0: all); for quick tries
            test_limit=0,  # evaluate on the first N test images (0: all 10,000)
            augment_shift=0,  # translate training images randomly by up to N pixels (0: off)
        )
    )
    c.model = ml_collections.ConfigDict(dict(name="softmax"))
    # lr = opt.lr * opt.decay ** epoch, applied per epoch as Keras's LearningRateScheduler.
    # schedule "onecycle": warm up to lr, then cosine down over the run (train.make_optimizer).
    c.opt = ml_collections.ConfigDict(dict(name="sgd", lr=0.01, decay=1.0, schedule="exponential"))
    c.log_every = 50  # steps between training-metric samples (train_steps.jsonl, progress bar)
    c.plots = True  # draw WORKDIR/plots/ at the end of a run
    c.checkpoint_every = 0  # also checkpoint every N steps inside epochs (0: at epoch ends only)
    c.restart = False  # start over: delete the work directory's checkpoints and metrics first
    c.debug_nans = False  # jax_debug_nans: stop at the first operation that makes a NaN
    c.dtype = "float32"  # bfloat16: convolutions and matmuls in bf16 (for GPUs); params float32
    c.devices = 0  # data-parallel over this many devices (0: all); see parallel.py
    # Several processes (hosts): jax.distributed.initialize() from these, or auto-detected.
    c.distributed = ml_collections.ConfigDict(
        dict(
            auto=False,  # let JAX find the cluster (SLURM, Open MPI, Kubernetes)
            coordinator="",  # host:port of process 0, e.g. 10.0.0.1:1234
            num_processes=0,
            process_id=-1,
        )
    )
    return c


def flag_name(path: str) -> str:
    """`data.train_limit` -> `--data-train-limit`: the flag users type for a config field."""
    return "--" + path.replace(".", "-").replace("_", "-")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the flag for values no run can use."""

    def check(ok: bool, path: str, what: str):
        if not ok:
            value = c
            for part in path.split("."):
                value = value[part]
            raise ConfigError(f"{flag_name(path)}: {what}, got {value!r}")

    check(c.epochs >= 1, "epochs", "must be at least 1")
    check(c.log_every >= 1, "log_every", "must be at least 1")
    check(c.checkpoint_every >= 0, "checkpoint_every", "must be 0 (epoch ends only) or positive")
    check(c.batch_size >= 1, "batch_size", "must be at least 1")
    check(c.devices >= 0, "devices", "must be 0 (all) or positive")
    check(c.dtype in ("float32", "bfloat16"), "dtype", "must be float32 or bfloat16")
    check(c.data.train_limit >= 0, "data.train_limit", "must be 0 (all) or positive")
    check(c.data.test_limit >= 0, "data.test_limit", "must be 0 (all) or positive")
    check(0 <= c.data.augment_shift <= 8, "data.augment_shift", "must be in 0..8 pixels")
    check(c.model.name in MODELS, "model.name", f"must be one of {', '.join(MODELS)}")
    check(c.opt.name in OPTIMIZERS, "opt.name", f"must be one of {', '.join(OPTIMIZERS)}")
    check(c.opt.lr > 0, "opt.lr", "must be positive")
    check(c.opt.schedule in SCHEDULES, "opt.schedule", f"must be one of {', '.join(SCHEDULES)}")
    check(0 < c.opt.decay <= 1, "opt.decay", "must be in (0, 1]")
    if "dropout" in c.model:
        check(0 <= c.model.dropout < 1, "model.dropout", "must be in [0, 1)")
    for key in ("features", "channels"):
        if key in c.model:
            check(
                len(c.model[key]) > 0 and all(n >= 1 for n in c.model[key]),
                f"model.{key}",
                "must be positive sizes",
            )
