"""Orbax checkpoints in WORKDIR/checkpoints, one per epoch, written atomically by Orbax.

Each checkpoint holds three items, so each reader takes only what it needs:
  model   {"params", "batch_stats"}: all that evaluation and prediction need;
  train   {"opt_state", "step"}: what resuming adds;
  metrics the epoch's metrics line, so metrics.jsonl can be repaired on resume.
"""

import json
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from mnist_jax import models
from mnist_jax.config import ConfigError

# Fields a resumed run must share with the checkpoint: they fix shapes, data order or step count.
RESUME_KEYS = ("model", "batch_size", "seed", "data.train_limit")
# Written once a first checkpoint is committed: from then on a work directory with no readable
# checkpoint has lost work (refused), before then it has lost none (started afresh).
COMMITTED = "checkpoint_committed"
RUN_FILES = (
    "checkpoints",
    COMMITTED,
    "metrics.jsonl",
    "train_steps.jsonl",
    "tensorboard",
    "plots",
    "eval.json",
)


def _lookup(config, path: str):
    for part in path.split("."):
        config = config.get(part) if config is not None else None
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Create the work directory; refuse to resume a run whose model or batching differ.

    With config.restart, first delete what an earlier run left (checkpoints, metrics, plots).
    """
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir}: is a file, not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot write there ({e.strerror})") from None
    if config.restart:
        for name in RUN_FILES:
            path = workdir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    old_path = workdir / "config.json"
    has_checkpoints = any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))
    if old_path.exists() and has_checkpoints:
        old = ml_collections.ConfigDict(json.loads(old_path.read_text()))
        for path in RESUME_KEYS:
            was, now = _lookup(old, path), _lookup(config, path)
            if json.dumps(was, default=list) != json.dumps(now, default=list):
                raise ConfigError(
                    f"--workdir {workdir}: holds a run with {path}={was}, not {now}; "
                    "choose another --workdir, or add --restart to start over there"
                )
    old_path.write_text(config.to_json(indent=2) + "\n")


def _screen(directory: Path, repair: bool) -> None:
    """Orbax's manager parses each step's metadata when it starts: screen them first.

    An unparseable one is deleted with a warning when `repair` (training resumes from an older
    checkpoint), else reported as one line.
    """
    for step_dir in sorted(p for p in directory.glob("*") if p.name.isdigit()):
        meta = step_dir / "_CHECKPOINT_METADATA"
        try:
            if meta.exists():
                json.loads(meta.read_text())
        except (ValueError, OSError) as e:
            if not repair:
                raise FileNotFoundError(
                    f"{step_dir}: damaged checkpoint ({type(e).__name__})"
                ) from None
            print(
                f"warning: checkpoint {step_dir} is unreadable ({type(e).__name__} in its "
                "metadata); deleting it and trying the previous one",
                file=sys.stderr,
            )
            shutil.rmtree(step_dir)


def manager(
    workdir: str | Path, keep_period: int | None = None, repair: bool = False
) -> ocp.CheckpointManager:
    """Keeps the newest 3 checkpoints, and every one at a multiple of keep_period (epoch ends)."""
    directory = Path(workdir).absolute() / "checkpoints"
    _screen(directory, repair)
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, max_to_keep=3, keep_period=keep_period
    )
    return ocp.CheckpointManager(directory, options=options)


def reader(workdir: str | Path) -> ocp.CheckpointManager:
    """A read-only manager for this process alone: no collective, so process 0 can restore for
    its plots while the others have finished (Orbax skips the barriers of a one-process set)."""
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{Path(workdir) / 'checkpoints'}: no checkpoint found")
    _screen(directory, repair=False)
    me = jax.process_index()
    options = ocp.CheckpointManagerOptions(
        read_only=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        ),
    )
    return ocp.CheckpointManager(directory, options=options)


def mark_committed(workdir: Path) -> None:
    """Call after `wait_until_finished`: note that a checkpoint has been committed, if one has."""
    marker = workdir / COMMITTED
    if not marker.exists() and any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
        marker.touch()


def _model_item(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _train_item(state) -> dict:
    return {"opt_state": state.opt_state, "step": state.step}


def save(mngr: ocp.CheckpointManager, state, metrics: dict, step: int) -> None:
    """Save asynchronously; Orbax copies the arrays before returning, so `state` may be donated."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(_model_item(state)),
            train=ocp.args.StandardSave(_train_item(state)),
            metrics=ocp.args.JsonSave(metrics),
        ),
    )


def restore_state(mngr: ocp.CheckpointManager, state, step: int | None = None):
    """(state, metrics) from checkpoint `step` (default latest), shaped like `state`."""
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
    restored = mngr.restore(
        mngr.latest_step() if step is None else step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(abstract(_model_item(state))),
            train=ocp.args.StandardRestore(abstract(_train_item(state))),
            metrics=ocp.args.JsonRestore(),
        ),
    )
    state = state.replace(**restored["model"], **restored["train"])
    return state, restored["metrics"]


def restore_latest(mngr: ocp.CheckpointManager, state, workdir: Path):
    """(state, metrics) from the newest readable checkpoint, or None for a new run.

    An unreadable checkpoint (half-written, truncated, files missing) is reported and deleted,
    and the one before it is tried: the run goes on from the last good one, never loops on a
    bad one. A work directory that holds a run's metrics but no readable checkpoint is refused
    rather than silently started over (--restart does that); one that never committed a
    checkpoint (killed in its first steps, or during its first save) lost nothing: it starts anew.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore_state(mngr, state, step)
        except Exception as e:  # Orbax and tensorstore raise many types for damaged files
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            print(
                f"warning: checkpoint {mngr.directory / str(step)} is unreadable "
                f"({type(e).__name__}: {reason}); deleting it and trying the previous one",
                file=sys.stderr,
            )
            mngr.delete(step)
    if (workdir / COMMITTED).exists():
        raise ConfigError(
            f"--workdir {workdir}: holds a run but no readable checkpoint in "
            f"{mngr.directory}; add --restart to start over"
        )
    return None


class Restored(NamedTuple):
    """What `model.apply` needs: `model.apply(variables, images, train=False)`."""

    model: nn.Module
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    step: int


def restore(workdir: str | Path, step: int | None = None) -> Restored:
    """Model, variables and config of a run's checkpoint (default: latest); no optimizer needed."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: not found; is {workdir} a training work directory?"
        )
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    mngr = reader(workdir)
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint found")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(
            f"{workdir / 'checkpoints'}: no checkpoint at step {step} (have {sorted(steps)})"
        )
    # Restore onto this process's first device, whatever devices or processes saved it.
    model = models.build(**config.model)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 28, 28, 1)), train=False)
    )
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
        {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})},
    )
    item = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    variables = {"params": item["model"]["params"], "batch_stats": item["model"]["batch_stats"]}
    return Restored(model, variables, config, step)
