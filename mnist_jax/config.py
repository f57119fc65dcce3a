"""The shared base config (each stage in `experiments/` overrides what changes); each leaf is a flag."""

import math

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot be trained with. The message names the flag."""


OPTIMIZERS = ("sgd", "adam", "optax_adam", "adamw")  # adam: Keras's, as the codelab's (optim.py)
SCHEDULES = ("exponential", "onecycle", "cosine", "constant")
LOSSES = ("cross_entropy",)
SEED_MODES = ("auto", "vmap", "turn")
CONV_GRADS = ("auto", "space_to_depth", "shifts", "xla")
DTYPES = ("float32", "bfloat16")
DIGITS = ("auto", "yes", "no")
PADDINGS = ("SAME", "VALID")  # the values models._check accepts for model.padding
# XLA:CPU kernel-library settings, as XLA_FLAGS (--xla-cpu NAME); docs/performance.md has each's speed and error.
# default: XLA's own; ynn-no-conv: convolutions kept from YNNPACK, conv_bn's step 1.2x faster. auto (the
# config's): ynn-no-conv where the process can still choose (startup.set_xla_cpu).
XLA_CPU = {"default": "", "ynn-no-conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}
XLA_CPUS = ("auto", *XLA_CPU)  # config.xla_cpu's values


# What a change to each field means when a command finds a run in its work directory (recipe.py;
# docs/design.md has the table). Every leaf has a class here, the one place: tests/test_recipe.py checks.
RECIPE = "recipe"  # changes what is trained or what its metrics measure: refused
ARITHMETIC = "arithmetic"  # the same recipe computed in another order: allowed, recorded, said
LENGTH = "length"  # epochs: a recipe field when the schedule spans the run, else allowed, recorded
NEITHER = "neither"  # how the run is watched, or where its files are: allowed, recorded
FIELD_CLASSES = {
    # Recipe: the seed, the batches, the weights it starts from, the images and how they train (data.test_limit:
    # those every epoch's metrics measure), the model, optimizer and loss, what they compute in.
    "seed": RECIPE,
    "epochs": LENGTH,
    **dict.fromkeys(("batch_size", "init_from", "data.num_classes", "data.val_split", "data.train_limit"), RECIPE),
    **dict.fromkeys(("data.test_limit", "data.augment_shift", "data.augment_rotate", "data.augment_scale"), RECIPE),
    **dict.fromkeys(("data.augment_shear", "data.augment_elastic", "data.augment_elastic_sigma"), RECIPE),
    **dict.fromkeys(("model.name", "model.features", "model.activation", "model.dropout", "model.channels"), RECIPE),
    **dict.fromkeys(("model.kernels", "model.strides", "model.dense", "model.batch_norm", "model.bn_momentum"), RECIPE),
    **dict.fromkeys(("model.padding", "model.pool", "model.gap", "opt.name", "opt.lr", "opt.decay"), RECIPE),
    **dict.fromkeys(("opt.schedule", "opt.warmup", "opt.momentum", "opt.nesterov", "opt.weight_decay"), RECIPE),
    **dict.fromkeys(("opt.clip_norm", "opt.ema", "loss.name", "loss.label_smoothing", "dtype"), RECIPE),
    # Arithmetic: other kernels, devices, processes or steps per call, the same recipe.
    **dict.fromkeys(("seed_mode", "steps_per_call", "checkpoint_every", "xla_cpu", "conv_grad", "devices"), ARITHMETIC),
    "distributed.num_processes": ARITHMETIC,
    # Neither: the stage's name (its recipe is in the other fields); where the files are (what they hold is
    # dataset.*); seeds (each seed's run is its own work directory, with seeds = 1); how the run is watched and
    # the classes shown; debug_nans (it checks each operation's output, and computes the same values); how the
    # processes find each other, and how long they wait for each other.
    **dict.fromkeys(("name", "workdir", "seeds", "data.dir", "data.tfds", "data.digits", "log_every"), NEITHER),
    **dict.fromkeys(("plots", "restart", "compile_cache", "debug_nans", "distributed.auto"), NEITHER),
    **dict.fromkeys(("distributed.coordinator", "distributed.process_id", "distributed.init_timeout"), NEITHER),
    **dict.fromkeys(("distributed.heartbeat_timeout", "distributed.shutdown_timeout"), NEITHER),
    # Not flags: what the data are, found when the run starts (data.identity): the data trained on, and how shown.
    **dict.fromkeys(("dataset.sha256", "dataset.num_train", "dataset.num_test", "dataset.image_shape"), RECIPE),
    "dataset.num_classes": RECIPE,
    **dict.fromkeys(("dataset.source", "dataset.names", "dataset.digits"), NEITHER),
}
SPANNING_SCHEDULES = ("onecycle", "cosine")  # the learning rate at a step depends on the run's length (epochs x steps)

# Each field's --help line, the one place (flags.py adds choices and default); tests/test_front_door.py checks.
HELP = {
    "workdir": "where the run's checkpoints, metrics and plots go; the same command again resumes there (default: runs/<stage>)",
    "seed": "the random seed: initial weights, data order and dropout masks",
    "seeds": "train N seeds (seed, seed+1, ...), each in WORKDIR/seed_<s>/, and print their spread",
    "seed_mode": "how --seeds N train: vmap (one vmapped program), turn (one after another), auto (vmap on GPU/TPU; on the CPU, turn for convolutions)",
    "epochs": "passes over the training images",
    "batch_size": "images per training step",
    "init_from": "start from another run's trained weights (its work directory; not its optimizer state or step; default: none)",
    "data.dir": "the IDX directory (the four MNIST files, raw or .gz); default: $MNIST_DATA_DIR, else TFDS's mnist",
    "data.tfds": "a TFDS image-classification dataset by name (fashion_mnist, cifar10, ...); wins over --data-dir and $MNIST_DATA_DIR",
    "data.num_classes": "how many classes (0: from the labels, or TFDS's label feature)",
    "data.digits": "whether the classes are MNIST-like digits 0-9, for the plots and predict (auto: guessed from the data)",
    "data.val_split": "hold out N training images as a validation set (0: none)",
    "data.train_limit": "train on the first N training images only (0: all); for quick tries",
    "data.test_limit": "evaluate on the first N test images only (0: all)",
    "data.augment_shift": "shift training images randomly by up to N pixels (0: off)",
    "data.augment_rotate": "rotate training images randomly by up to this many degrees either way (0: off)",
    "data.augment_scale": "scale training images randomly by 1 +- up to this fraction (0: off)",
    "data.augment_shear": "shear training images randomly by up to this many degrees either way (0: off)",
    "data.augment_elastic": "elastic distortion (Simard et al. 2003): displacements of up to this many pixels, smoothed (0: off)",
    "data.augment_elastic_sigma": "the elastic distortion's smoothing: a Gaussian of this many pixels",
    "model.name": "the model (a stage sets its fields)",
    "model.features": "mlp: the hidden layers' widths, comma-separated",
    "model.activation": "mlp: the hidden layers' activation",
    "model.dropout": "dropout rate (0: off): mlp after each hidden layer, conv before the last dense layer",
    "model.channels": "conv: each convolution's output channels, comma-separated",
    "model.kernels": "conv: each convolution's kernel size, one per --model-channels entry",
    "model.strides": "conv: each convolution's stride, one per --model-channels entry",
    "model.dense": "conv: the hidden dense layer's width (0: none)",
    "model.batch_norm": "conv: batch normalisation between each layer and its relu (the layers lose their biases)",
    "model.bn_momentum": "conv with batch norm: the running statistics' decay",
    "model.padding": "conv: the convolutions' padding",
    "model.pool": "conv: a max-pooling size after each convolution, comma-separated (empty: none; 1: none there)",
    "model.gap": "conv: global average pooling before the head",
    "opt.name": "the optimizer (adam: Keras's, as the codelab; optax_adam: optax's; adamw: with --opt-weight-decay)",
    "opt.lr": "the peak learning rate",
    "opt.decay": "the exponential schedule's factor per epoch (not the weight decay)",
    "opt.schedule": "the learning rate's shape: exponential (x --opt-decay each epoch), onecycle, cosine (after --opt-warmup), constant",
    "opt.warmup": "cosine: the fraction of the run spent warming up",
    "opt.momentum": "sgd: heavy-ball momentum (0: none)",
    "opt.nesterov": "sgd with --opt-momentum: Nesterov's momentum",
    "opt.weight_decay": "adamw: decoupled weight decay",
    "opt.clip_norm": "clip gradients to this global norm first (0: off)",
    "opt.ema": "average the weights and batch-norm statistics over the steps with this decay (0.999, say), evaluated and saved as the model (0: off)",
    "loss.name": "the training loss",
    "loss.label_smoothing": "move this much of each target's probability to the other classes (0: off)",
    "steps_per_call": "training steps per compiled call (0: the whole epoch on GPU/TPU; on the CPU 8, unrolled, in a conv net's run of 2,000+ steps, else 1)",
    "log_every": "steps between training-metric samples (train_steps.jsonl, the progress bar)",
    "plots": "draw WORKDIR/plots/ at the end of the run",
    "checkpoint_every": "also checkpoint every N steps (0: at the end of each epoch only)",
    "restart": "start over: delete the work directory's checkpoints and metrics first",
    "compile_cache": "JAX's persistent compilation cache, so a second run skips compiling ('': off; $JAX_COMPILATION_CACHE_DIR wins)",
    "debug_nans": "stop at the first operation that makes a NaN (slow; to find it)",
    "xla_cpu": "XLA:CPU kernel settings, set as XLA_FLAGS: default (XLA's own) or ynn-no-conv; auto: ynn-no-conv unless XLA_FLAGS choose, or JAX has started (experiments.xla_cpu measures them)",
    "conv_grad": "convolutions' forms for XLA:CPU: space_to_depth (stride-2 input gradients as stride-1 convolutions, 4x faster), shifts (also one-channel first layers as shifted multiply-adds) or xla's; auto: shifts on the CPU, xla's elsewhere",
    "dtype": "what convolutions and matmuls compute in (bfloat16: for GPUs); parameters stay float32",
    "devices": "data-parallel over this many devices (0: all)",
    "distributed.auto": "several processes: let JAX find the cluster (SLURM, Open MPI, Kubernetes)",
    "distributed.coordinator": "several processes: host:port of process 0, e.g. 10.0.0.1:1234",
    "distributed.num_processes": "several processes: how many, with --distributed-coordinator",
    "distributed.process_id": "several processes: this one's index in 0..N-1, with --distributed-coordinator",
    "distributed.heartbeat_timeout": "seconds: a process silent this long counts as lost, and the others stop (exit 4)",
    "distributed.shutdown_timeout": "seconds a finished process waits for the others at the end",
    "distributed.init_timeout": "seconds to wait for every process to join at the start",
}


MODEL_CHOICES: dict[str, tuple] = {}  # models.py's names and activations, registered there: it sits above this module


def choices() -> dict:
    """{field: its values} of the fields with a fixed set, from their registries: --help is never stale."""
    fixed = {"seed_mode": SEED_MODES, "data.digits": DIGITS, **MODEL_CHOICES, "model.padding": PADDINGS}
    fixed.update({"opt.name": OPTIMIZERS, "opt.schedule": SCHEDULES, "loss.name": LOSSES})
    return {**fixed, "xla_cpu": XLA_CPUS, "conv_grad": CONV_GRADS, "dtype": DTYPES}


def base() -> ml_collections.ConfigDict:
    """The base config; each field's meaning is its line in HELP."""
    config = ml_collections.ConfigDict()
    config.name = "base"  # the stage; default work directory is runs/<name>
    config.workdir = ""  # "" -> runs/<name>
    config.update(seed=0, seeds=1, seed_mode="auto", epochs=10, batch_size=128)
    config.data = ml_collections.ConfigDict(dict(dir="", tfds="", num_classes=0, digits="auto"))
    config.data.update(val_split=0, train_limit=0, test_limit=0, augment_shift=0)
    # On the device, in the step (train.random_warp); all 0: off.
    config.data.update(augment_rotate=0.0, augment_scale=0.0, augment_shear=0.0)
    config.data.update(augment_elastic=0.0, augment_elastic_sigma=4.0)
    config.model = ml_collections.ConfigDict(dict(name="softmax"))
    # The rate at step t is opt.lr * schedule(t), the schedule peaking at 1 (optim.shape):
    # exponential: decay ** epoch, applied per epoch as Keras's LearningRateScheduler.
    # lr: data in the optimizer's state, not in its program.
    config.opt = ml_collections.ConfigDict(dict(name="sgd", lr=0.01, decay=1.0, schedule="exponential", warmup=0.0))
    config.opt.update(momentum=0.0, nesterov=False, weight_decay=0.0, clip_norm=0.0)  # sgd's, adamw's, every one's
    config.opt.ema = 0.0  # train.py: an exponential moving average of the weights, off
    config.loss = ml_collections.ConfigDict(dict(name="cross_entropy", label_smoothing=0.0))
    config.steps_per_call = 0  # steps per compiled call (a lax.scan)
    config.update(log_every=50, plots=True, checkpoint_every=0, restart=False)
    config.init_from = ""  # with --seeds, its seed_<s>/ when it has them
    config.compile_cache = "~/.cache/mnist_jax"  # $JAX_COMPILATION_CACHE_DIR wins (the test suite sets one)
    config.debug_nans = False
    config.xla_cpu = "auto"  # XLA_FLAGS set before JAX's backend starts
    config.conv_grad = "auto"  # startup.resolve picks per backend
    config.dtype = "float32"
    config.devices = 0  # see parallel.py
    # Several processes (hosts): jax.distributed.initialize() from these, or auto-detected.
    # heartbeat_timeout: not JAX's 100: stop (exit 4) well before the job's wall-clock limit;
    # shutdown_timeout: JAX's default: process 0 may still be drawing the plots.
    config.distributed = ml_collections.ConfigDict(dict(auto=False, coordinator="", num_processes=0, process_id=-1))
    config.distributed.update(heartbeat_timeout=60, shutdown_timeout=300, init_timeout=300)
    return config


def flag_name(path: str) -> str:
    """`data.train_limit` -> `--data-train-limit`: the flag users type for a config field."""
    return "--" + path.replace(".", "-").replace("_", "-")


def leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted path, value) for every leaf field."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the flag for values no run can use; models.build checks the model's fields."""

    def check(ok: bool, path: str, what: str):
        if not ok:
            raise ConfigError(f"{flag_name(path)}: {what}, got {config[path]!r}")  # a dotted path reads nested fields

    for path, value in leaves(config):  # inf and nan pass every comparison below but one
        check(not isinstance(value, float) or math.isfinite(value), path, "must be a finite number")
    check(config.epochs >= 1, "epochs", "must be at least 1")
    check(config.seeds >= 1, "seeds", "must be at least 1")
    check(config.seed_mode in SEED_MODES, "seed_mode", f"must be one of {', '.join(SEED_MODES)}")
    check(config.steps_per_call >= 0, "steps_per_call", "must be 0 (per backend) or positive")
    check(config.log_every >= 1, "log_every", "must be at least 1")
    check(config.checkpoint_every >= 0, "checkpoint_every", "must be 0 (epoch ends only) or positive")
    check(config.batch_size >= 1, "batch_size", "must be at least 1")
    for key in ("heartbeat_timeout", "shutdown_timeout", "init_timeout"):
        check(config.distributed[key] >= 1, f"distributed.{key}", "must be at least 1 second")
    check(config.devices >= 0, "devices", "must be 0 (all) or positive")
    check(config.dtype in DTYPES, "dtype", f"must be {' or '.join(DTYPES)}")
    check(config.xla_cpu in XLA_CPUS, "xla_cpu", f"must be one of {', '.join(XLA_CPUS)}")
    check(config.conv_grad in CONV_GRADS, "conv_grad", f"must be one of {', '.join(CONV_GRADS)}")
    check(config.data.train_limit >= 0, "data.train_limit", "must be 0 (all) or positive")
    check(config.data.test_limit >= 0, "data.test_limit", "must be 0 (all) or positive")
    check(0 <= config.data.augment_shift <= 8, "data.augment_shift", "must be in 0..8 pixels")
    check(0 <= config.data.augment_rotate <= 180, "data.augment_rotate", "must be in 0..180 degrees")
    check(0 <= config.data.augment_scale < 1, "data.augment_scale", "must be a fraction in [0, 1)")
    check(0 <= config.data.augment_shear < 90, "data.augment_shear", "must be in 0..90 degrees (not 90)")
    check(0 <= config.data.augment_elastic <= 100, "data.augment_elastic", "must be in 0..100 pixels")
    check(0 < config.data.augment_elastic_sigma <= 20, "data.augment_elastic_sigma", "must be in (0, 20] pixels")
    check(config.data.num_classes >= 0, "data.num_classes", "must be 0 (from the labels) or more")
    check(config.data.digits in DIGITS, "data.digits", "must be auto, yes or no")
    check(config.data.val_split >= 0, "data.val_split", "must be 0 (none) or positive")
    opt = config.opt
    check(opt.name in OPTIMIZERS, "opt.name", f"must be one of {', '.join(OPTIMIZERS)}")
    check(opt.lr > 0, "opt.lr", "must be positive")
    check(opt.schedule in SCHEDULES, "opt.schedule", f"must be one of {', '.join(SCHEDULES)}")
    check(0 < opt.decay <= 1, "opt.decay", "must be in (0, 1]")
    check(0 <= opt.warmup < 1, "opt.warmup", "must be a fraction of the run, in [0, 1)")
    check(0 <= opt.momentum < 1, "opt.momentum", "must be in [0, 1)")
    check(opt.momentum > 0 or not opt.nesterov, "opt.nesterov", "needs --opt-momentum")
    check(opt.name == "sgd" or not (opt.momentum or opt.nesterov), "opt.momentum", "is sgd's; the adams have their own")
    check(opt.weight_decay >= 0, "opt.weight_decay", "must be 0 or positive")
    check(opt.name == "adamw" or not opt.weight_decay, "opt.weight_decay", "decays weights with --opt-name adamw only")
    check(opt.clip_norm >= 0, "opt.clip_norm", "must be 0 (off) or positive")
    check(0 <= opt.ema < 1, "opt.ema", "must be 0 (off) or a decay in (0, 1)")
    check(config.loss.name in LOSSES, "loss.name", f"must be one of {', '.join(LOSSES)}")
    check(0 <= config.loss.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")
