"""Orbax checkpoints in WORKDIR/checkpoints, one per epoch, written atomically by Orbax.

Each checkpoint holds three items, so each reader takes only what it needs:
  model   {"params", "batch_stats"}: all that evaluation and prediction need;
  train   {"opt_state", "step"}: what resuming adds;
  metrics the epoch's metrics line, so metrics.jsonl can be repaired on resume.
"""

import json
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from mnist_jax import models


def manager(workdir: str | Path) -> ocp.CheckpointManager:
    directory = Path(workdir).absolute() / "checkpoints"
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))


def _model_item(state) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def _train_item(state) -> dict:
    return {"opt_state": state.opt_state, "step": state.step}


def save(mngr: ocp.CheckpointManager, state, metrics: dict) -> None:
    """Save asynchronously; Orbax copies the arrays before returning, so `state` may be donated."""
    mngr.save(
        int(state.step),
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
        raise FileNotFoundError(f"{config_path}: not found; is {workdir} a training work directory?")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    mngr = manager(workdir)
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint found")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(
            f"{workdir / 'checkpoints'}: no checkpoint at step {step} (have {sorted(steps)})"
        )
    item = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore()))["model"]
    variables = {"params": item["params"], "batch_stats": item.get("batch_stats") or {}}
    return Restored(models.build(**config.model), variables, config, step)
