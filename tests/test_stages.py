"""Every stage runs end to end (a few steps, real data) through its own command-line entry point."""

import importlib
import re

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
    out, err = capsys.readouterr()
    assert "epoch   2/2" in out
    # Four SGD steps leave the sigmoid net predicting one class (the loop says so); the others learn.
    assert ("warning: epoch 1: the model predicts class" in err) == (name == "dense_sigmoid"), err


def test_loop_warns_of_a_collapse(mnist, mnist_dir, tmp_path, capsys):
    # conv's seed 21 on the first 2,560 training images: the loss jumps at step 2 and every ReLU
    # of the dense layer dies; from then on the net predicts one class for every image.
    from experiments import conv

    cli.run(conv.get_config, ["--seed", "21", "--epochs", "2", "--data-train-limit", "2560",
            "--plots", "false", "--data-dir", str(mnist_dir), "--workdir", str(tmp_path)])  # fmt: skip
    rows = metrics.read(tmp_path / "metrics.jsonl")
    counts = np.bincount(mnist.test_labels)
    assert round(rows[0]["val_accuracy"] * 10_000) == counts[1]
    # Epoch 2 still predicts one class (the output bias moves, so maybe another): never learns.
    assert round(rows[1]["val_accuracy"] * 10_000) in counts
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(  # once, not every epoch
        "warning: epoch 1: the model predicts class 1 for every test image (val_acc 11.35%)"
    )
    # ... and says why: a hidden layer whose every unit is dead.
    counts = re.findall(r"hidden_\d (\d+)/(\d+)", warnings[0])
    assert len(counts) == 4 and any(d == n for d, n in counts), warnings[0]


def test_report_tables_the_runs(mnist_dir, tmp_path, capsys):
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
                "true" if stage is linear else "false",
                "--data-dir",
                str(mnist_dir),
                "--workdir",
                str(tmp_path / name),
            ],
        )
    # The command draws the plots once training has returned (loop.py draws none).
    assert f"Plots in {tmp_path / 'linear' / 'plots'}" in capsys.readouterr().out
    assert (tmp_path / "linear" / "plots" / "test_digits.png").exists()
    assert not (tmp_path / "dense_relu" / "plots").exists()
    report.main(["--runs", str(tmp_path)])
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["`linear`", "`dense_relu`"]
    acc = metrics.read(tmp_path / "linear" / "metrics.jsonl")[0]["val_accuracy"]
    assert lines[2].split("|")[2].strip() == "7,850" and f"{acc:.2%}" in lines[2]
    assert (tmp_path / "report.png").stat().st_size > 10_000
