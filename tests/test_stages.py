"""Every stage runs end to end (a few steps, real data) through its own command-line entry point."""

import importlib

import numpy as np
import pytest

from mnist_jax import cli, metrics
from tests.test_models import PARAMS


@pytest.mark.parametrize("name", PARAMS)
def test_stage_runs_end_to_end(name, mnist_dir, tmp_path, capsys):
    stage = importlib.import_module(f"experiments.{name}")
    args = [
        "--epochs",
        "2",
        "--data-train-limit",
        "512",
        "--data-test-limit",
        "500",
        "--plots",
        "false",
        "--data-dir",
        str(mnist_dir),
        "--workdir",
        str(tmp_path),
    ]
    cli.run(stage.get_config, args)
    rows = metrics.read(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    assert rows[-1]["val_accuracy"] > 0.1  # better than chance after a few steps on real digits
    assert "epoch   2/2" in capsys.readouterr().out


def test_report_tables_the_runs(mnist_dir, tmp_path):
    from experiments import dense_relu, linear, report

    for stage in (dense_relu, linear):
        name = stage.__name__.rsplit(".", 1)[-1]
        cli.run(
            stage.get_config,
            [
                "--epochs",
                "1",
                "--data-train-limit",
                "256",
                "--data-test-limit",
                "200",
                "--plots",
                "false",
                "--data-dir",
                str(mnist_dir),
                "--workdir",
                str(tmp_path / name),
            ],
        )
    report.main(["--runs", str(tmp_path)])
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["`linear`", "`dense_relu`"]
    acc = metrics.read(tmp_path / "linear" / "metrics.jsonl")[0]["val_accuracy"]
    assert lines[2].split("|")[2].strip() == "7,850" and f"{acc:.2%}" in lines[2]
    assert (tmp_path / "report.png").stat().st_size > 10_000
