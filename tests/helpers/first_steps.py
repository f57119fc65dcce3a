"""A row record's first steps trained again (tests/test_rows.py), in this process or, for a record made
with other XLA:CPU kernels, in one started with them:

    python -m tests.helpers.first_steps RECORD_JSON DATA_DIR WORKDIR CHANGES_JSON   # prints the rows as JSON
"""

import importlib
import json
import sys
from pathlib import Path

import pytest

from experiments import rows
from mnist_jax import hooks, metrics, seeds, startup


class _Enough(Exception):
    pass


class StopAfter(hooks.Hook):
    def __init__(self, step: int):
        self.step = step

    def after_steps(self, run, new):
        if run.step >= self.step:  # MetricsFiles, a default hook, has logged this row already
            raise _Enough


def first_steps(rec: dict, mnist_dir, workdir, **changes) -> list[dict]:
    """The record's stage trained again to step 100 as its run was: seed 0's logged rows."""
    runtime = rec["runtime"]
    config = importlib.import_module(f"experiments.{rec['stage']}").get_config()
    config.name, config.data.dir, config.plots = rec["stage"], str(mnist_dir), False
    vmapped = runtime["seed_mode"] == "vmap"
    config.seed, config.seeds = rec["seeds"][0], len(rec["seeds"]) if vmapped else 1
    config.seed_mode = runtime["seed_mode"]
    config.steps_per_call, config.conv_grad = runtime["steps_per_call"], runtime["conv_grad"]
    config.xla_cpu = runtime["xla_cpu"]
    startup.set_xla_cpu(config)  # in a fresh process, before JAX starts; in one that runs them, nothing to do
    for path, value in changes.items():
        config.update_from_flattened_dict({path: value})
    with pytest.raises(_Enough):
        seeds.train(config, workdir, hooks=[StopAfter(rows.FIRST_STEPS)], save=False, report=False)  # fmt: skip
    first = Path(workdir) / f"seed_{config.seed}" if config.seeds > 1 else Path(workdir)
    return [{"step": r["step"], "loss": r["loss"]} for r in metrics.read(first / metrics.STEPS_FILE)]  # fmt: skip


if __name__ == "__main__":
    rec, data_dir, workdir, changes = sys.argv[1:]
    print(json.dumps(first_steps(json.loads(rec), data_dir, workdir, **json.loads(changes))))
