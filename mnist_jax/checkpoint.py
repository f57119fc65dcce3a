"""Orbax checkpoints in WORKDIR/checkpoints: items model, train, metrics and run, in layouts 1-3,
all readable (docs/design.md, "Interrupted runs and checkpoints")."""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from mnist_jax import data, models
from mnist_jax.config import ConfigError

# Once a checkpoint is committed, a work directory with none readable has lost work (refused).
COMMITTED = "checkpoint_committed"
DAMAGED = "damaged"  # WORKDIR/damaged/<step>: checkpoints that could not be read, moved aside
# What --restart deletes: everything a run writes but config.json and summary.txt, rewritten.
RUN_FILES = ("checkpoints", COMMITTED, DAMAGED, "config_history.jsonl", "metrics.jsonl", "train_steps.jsonl")
RUN_FILES += ("tensorboard", "plots", "eval.json")


class Damaged(Exception):
    """A checkpoint that cannot be read: metadata unparseable, files truncated or missing."""


# Orbax exceptions that say how we called it, not what is on disk: bugs, never damage.
BUGS = (TypeError, AttributeError, NameError, AssertionError, ImportError, NotImplementedError)


def steps(workdir: Path) -> list[int]:
    """The committed checkpoints' steps, newest first (Orbax renames a finished one to its step)."""
    found = (p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit() and p.is_dir())
    return sorted((int(p.name) for p in found), reverse=True)


def screen(workdir: Path) -> list[tuple[int, str]]:
    """(step, reason) of checkpoints whose files Orbax's manager parses on start do not parse."""
    bad = []
    for step in steps(workdir):
        step_dir = workdir / "checkpoints" / str(step)
        for name, path in (("metadata", "_CHECKPOINT_METADATA"), ("metrics item", "metrics/metrics")):
            try:
                if (step_dir / path).exists():
                    json.loads((step_dir / path).read_text())
            except (ValueError, OSError) as e:
                bad.append((step, f"{type(e).__name__} in its {name}"))
                break
    return bad


def _empty(x) -> bool:
    return x is None or (isinstance(x, (dict, list, tuple)) and not x)


def _same(a, b) -> bool:
    """Two leaves of a tree and a checkpoint's metadata: the same shape and dtype, or both empty."""
    if _empty(a) or _empty(b):
        return _empty(a) and _empty(b)
    return (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype)


def _describe(x) -> str:
    """One side of an Orbax tree difference, in words."""
    if x is None:
        return "absent"
    if hasattr(x, "shape"):
        return f"{tuple(x.shape)} {x.dtype}"
    if isinstance(x, type):
        return f"a {x.__name__}"
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], type):
        return f"a {x[0].__name__} of {x[1]}"
    return "present"


def mismatch(step_dir: Path, items: dict) -> str | None:
    """The first leaf where checkpoint `step_dir` differs from `items` ({item: tree}) in structure,
    shape or dtype, in words; None if it fits. Damaged if its metadata cannot be read."""
    handler = ocp.StandardCheckpointHandler()
    step_dir = Path(step_dir).absolute()  # Orbax refuses a relative path
    for name, tree in items.items():
        try:
            saved = handler.metadata(step_dir / name).tree
        except BUGS:
            raise
        except Exception as e:  # Orbax and tensorstore raise many types for damaged files
            raise Damaged(f"its {name} metadata: {reason(e)}") from None
        tree = jax.tree.map(lambda x: x if hasattr(x, "dtype") else jnp.asarray(x), tree)
        ours = ocp.tree.serialize_tree(tree, keep_empty_nodes=True)  # a fresh state's step is 0
        is_leaf = lambda x: _empty(x) or hasattr(x, "shape")
        diff = ocp.tree.tree_difference(ours, saved, is_leaf=is_leaf, leaves_equal=_same)
        if diff is not None:
            flat = ocp.tree.to_flat_dict(diff, is_leaf=lambda x: type(x).__name__ == "Diff")  # Orbax's, not exported
            path, d = min(flat.items(), key=lambda item: [str(k) for k in item[0]])
            where = ".".join([name, *map(str, path)])
            return f"{where} is {_describe(d.lhs)} here, {_describe(d.rhs)} in the checkpoint"
    return None


def reason(e: Exception) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:160]


def manager(workdir: str | Path, keep_period: int | None = None) -> ocp.CheckpointManager:
    """Keeps the newest 3 checkpoints, and every one at a multiple of keep_period (epoch ends)."""
    directory = Path(workdir).absolute() / "checkpoints"
    options = dict(create=True, cleanup_tmp_directories=True, max_to_keep=3, keep_period=keep_period)
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options))


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    """Orbax logs a warning per option a read-only manager turns off: notes for its developers."""
    message = record.getMessage()
    return "read_only=True" not in message and "directory is read only" not in message


def reader(workdir: str | Path) -> ocp.CheckpointManager:
    """A read-only manager for this process alone (Orbax skips a one-process set's barriers), so
    process 0 can restore for its plots while the others have finished."""
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{Path(workdir) / 'checkpoints'}: no checkpoint found")
    for step, reason in screen(Path(workdir)):
        raise FileNotFoundError(f"{directory / str(step)}: damaged checkpoint ({reason})")
    me, log = jax.process_index(), logging.getLogger("absl")
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    log.addFilter(_not_read_only_notice)
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=alone)
        return ocp.CheckpointManager(directory, options=options)
    finally:
        log.removeFilter(_not_read_only_notice)


def mark_committed(workdir: Path) -> None:
    """Call after `wait_until_finished`: note that a checkpoint has been committed, if one has."""
    marker = workdir / COMMITTED
    if not marker.exists() and steps(workdir):
        marker.touch()


def model_item(state) -> dict:
    """The model a run publishes (evaluate, predict, --init-from): the weights' average with --opt-ema."""
    source = state.ema if state.ema is not None else {"params": state.params, "batch_stats": state.batch_stats}
    return {"params": source["params"], "batch_stats": source["batch_stats"]}


def items(state, layout: int | None = None) -> dict:
    """What a checkpoint of `layout` (default: the one save writes) holds of a TrainState: the
    model, and (layout 3) every other data field but an empty one (a field off, EMA's when off).
    With --opt-ema the model is the average: the trained weights are in the train item."""
    if (layout or LAYOUT) < 3:
        return {"model": model_item(state), "train": {"opt_state": state.opt_state, "step": state.step}}
    train = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in ("apply_fn", "tx")}
    train = {k: v for k, v in train.items() if v is not None}
    if "ema" in train:
        train["ema"] = {"decay": train["ema"]["decay"]}
    else:
        train = {k: v for k, v in train.items() if k not in ("params", "batch_stats")}
    return {"model": model_item(state), "train": train}


def from_items(state, restored: dict):
    """`state` with a checkpoint's items (`items`'s, restored) put back."""
    train, model = dict(restored["train"]), restored["model"]
    if "ema" in train:  # the model item is the average
        ema = {**train.pop("ema"), **model}
        return state.replace(**train, ema=ema)
    return state.replace(**model, **train)


LAYOUT = 3  # what save writes (the module's docstring)


def _run_item(step_dir: Path) -> dict:
    return json.loads((Path(step_dir) / "run" / "metadata").read_text())


def layout(step_dir: Path) -> int:
    """The layout checkpoint `step_dir` was written in (1 if it does not say)."""
    try:
        return int(_run_item(step_dir)["layout"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def save(mngr: ocp.CheckpointManager, state, metrics: dict, step: int, config: dict) -> None:
    """Save asynchronously (Orbax copies the arrays first: `state` may be donated); config: config.json's."""
    trees = {name: ocp.args.StandardSave(tree) for name, tree in items(state).items()}  # model, train
    run = ocp.args.JsonSave({"layout": LAYOUT, "config": config})
    mngr.save(step, args=ocp.args.Composite(**trees, metrics=ocp.args.JsonSave(metrics), run=run))


def recorded_config(workdir: Path) -> tuple[int, dict] | None:
    """(step, recipe) from the newest checkpoint that carries one (layout 2 on), else None."""
    for step in steps(workdir):
        try:
            return step, _run_item(workdir / "checkpoints" / str(step))["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # layout 1, or a damaged item: the one before may still say
    return None


def abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore_state(mngr: ocp.CheckpointManager, state, step: int | None = None):
    """(state, metrics) from checkpoint `step` (default latest), shaped like `state`."""
    step = mngr.latest_step() if step is None else step
    trees = items(state, layout(Path(mngr.directory) / str(step)))
    args = {name: ocp.args.StandardRestore(abstract(tree)) for name, tree in trees.items()}
    restored = mngr.restore(step, args=ocp.args.Composite(**args, metrics=ocp.args.JsonRestore()))
    return from_items(state, restored), restored["metrics"]


class Restored(NamedTuple):
    """What `model.apply` needs: `model.apply(variables, images, train=False)`."""

    model: nn.Module
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    step: int

    @property
    def weights(self) -> str:
        """Which weights `variables` are: the trained ones, or their average (--opt-ema)."""
        decay = self.config.opt.get("ema", 0.0)
        return f"the weights' moving average (--opt-ema {decay})" if decay else "the trained weights"


def read_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is {workdir} a training work directory?")
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable config ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: not a run's config (a JSON {type(tree).__name__}, not an object)")
    try:
        return ml_collections.ConfigDict(tree)
    except ValueError as e:  # a hand-edited key such as "opt.lr"
        raise ConfigError(f"{path}: not a run's config ({e})") from None


def _restore_model(workdir: Path, step: int | None, target: dict) -> tuple[dict, int]:
    """(variables shaped like `target`, on this process's first device, step) of checkpoint `step`."""
    mngr = reader(workdir)
    found = mngr.all_steps()
    if not found:
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint found")
    if step is None:
        step = max(found)
    elif step not in found:
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint at step {step} (have {sorted(found)})")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), target)
    step_dir = workdir / "checkpoints" / str(step)
    try:
        diff = mismatch(step_dir, {"model": target})
    except Damaged as e:
        raise FileNotFoundError(f"{step_dir}: damaged checkpoint ({e})") from None
    if diff is not None:
        raise ConfigError(f"{step_dir}: does not fit the model this code builds ({diff})")
    return mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))["model"], step


def restore(workdir: str | Path, step: int | None = None) -> Restored:
    """Model, variables (the published ones: `Restored.weights`) and config of a run's checkpoint
    (default: latest); no optimizer needed.
    FileNotFoundError or ConfigError, one line, for a run this code cannot restore."""
    workdir = Path(workdir).expanduser()
    config = read_config(workdir)
    image_shape, num_classes, _ = data.spec(config)
    try:
        model = models.build(**config.model, num_classes=num_classes)
    except ConfigError as e:
        raise ConfigError(f"{workdir / 'config.json'}: this code cannot build its model ({e})") from None
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
    target = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    variables, step = _restore_model(workdir, step, target)
    return Restored(model, variables, config, step)


def seed_dir(workdir, seed: int) -> Path:
    """Where seed `seed` of a several-seed run (--seeds, a sweep's --trial-seeds) lives."""
    return Path(workdir) / f"seed_{seed}"


def init_from(state, source: Path, seed: int):
    """(`state` with the trained variables of `source` (or its seed_<seed>/), {"dir", "step"} of them)."""
    source = Path(source).expanduser()
    seeded = sorted(p.name for p in source.glob("seed_*") if p.is_dir())
    if seeded:
        if seed_dir(source, seed).name not in seeded:
            raise ConfigError(
                f"--init-from {source}: holds {', '.join(seeded)}, no {seed_dir('', seed)}/ for seed {seed}"
            )
        source = seed_dir(source, seed)
    try:
        variables, step = _restore_model(source, None, abstract(model_item(state)))
    except (FileNotFoundError, ConfigError) as e:
        raise ConfigError(f"--init-from: {e}") from None
    state = state.replace(**variables)
    if state.ema is not None:  # the average starts from them too
        state = state.replace(ema={**state.ema, **jax.tree.map(jnp.copy, variables)})
    return state, {"dir": str(source.resolve()), "step": step}
