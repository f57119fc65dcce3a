"""Every stage runs end to end (a few steps, real data) through its own command-line entry point."""

import importlib

import numpy as np
import pytest

from mnist_jax import cli, metrics
from tests.test_models import PARAMS


@pytest.mark.parametrize("name", PARAMS)
def test_stage_runs_end_to_end(name, mnist_dir, tmp_path, capsys):
    stage = importlib.import_module(f"experiments.{name}")
    args = ["--epochs", "2", "--data-train-limit", "512", "--data-test-limit", "500",
            "--data-dir", str(mnist_dir), "--workdir", str(tmp_path)]
    cli.run(stage.get_config, args)
    rows = metrics.read(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    assert rows[-1]["val_accuracy"] > 0.1  # better than chance after a few steps on real digits
    assert "epoch   2/2" in capsys.readouterr().out
