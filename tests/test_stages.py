"""Every stage runs end to end (a few steps, real data) through its own command-line entry point."""

import importlib
import re

import numpy as np
import pytest

import mnist_jax
from mnist_jax import cli, diagnostics, metrics, predict
from tests.test_models import PARAMS


@pytest.mark.parametrize("name", PARAMS)
def test_stage_runs_end_to_end(name, mnist, mnist_dir, tmp_path, capsys):
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
    assert all(np.isfinite(r["test_loss"]) for r in rows)
    out, err = capsys.readouterr()
    assert "epoch   2/2" in out
    # No accuracy bar: what 8 steps reach is a draw. Seeds 0-9 of this setting: linear 7.0-18.8%,
    # dense_relu 50.0-62.6%; dense_sigmoid predicts one class after 8 steps in 4 of 10 seeds.
    # Learning is tested on real budgets (test_real_training, test_train). What must hold for
    # any draw: a run that predicts one class for every test image says so, and says it right.
    labels = mnist.test_labels[:500]
    predictions = predict.probabilities(mnist_jax.restore(tmp_path), mnist.test_images[:500])
    warnings = re.findall(r"warning: epoch (\d): the model predicts class (\d) .*\(test_acc ([\d.]+)%\)", err)  # fmt: skip
    if diagnostics.collapsed_to(predictions.argmax(-1)) is not None:
        assert warnings, err
    for epoch, label, accuracy in warnings:
        logged = rows[int(epoch) - 1]["test_accuracy"]
        assert f"{logged:.2%}" == f"{accuracy}%" and logged * 500 == pytest.approx((labels == int(label)).sum())  # fmt: skip


def test_loop_warns_of_a_collapse(mnist, mnist_dir, tmp_path, capsys):
    # conv's seed 21 on the first 2,560 training images: the loss jumps at step 2 (2.29, 5.76) and
    # every ReLU of the second and third convolutions dies; from then on the net predicts one
    # class for every image. Not a knife edge that another CPU's rounding could tip: with its
    # initial weights perturbed by a relative 1e-5 (100x float32 rounding) in 7 random
    # directions, every run collapsed the same way (same loss, same dead units, 11.35%).
    from experiments import conv

    cli.run(conv.get_config, ["--seed", "21", "--epochs", "2", "--data-train-limit", "2560",
            "--plots", "false", "--data-dir", str(mnist_dir), "--workdir", str(tmp_path)])  # fmt: skip
    rows = metrics.read(tmp_path / "metrics.jsonl")
    counts = np.bincount(mnist.test_labels)
    assert round(rows[0]["test_accuracy"] * 10_000) == counts[1]
    # Epoch 2 still predicts one class (the output bias moves, so maybe another): never learns.
    assert round(rows[1]["test_accuracy"] * 10_000) in counts
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(  # once, not every epoch
        "warning: epoch 1: the model predicts class 1 for every test image (test_acc 11.35%)"
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
    # The plots hook draws them once training has ended; --plots false leaves it out.
    assert f"Plots in {tmp_path / 'linear' / 'plots'}" in capsys.readouterr().out
    assert (tmp_path / "linear" / "plots" / "test_digits.png").exists()
    assert not (tmp_path / "dense_relu" / "plots").exists()
    report.main(["--runs", str(tmp_path)])
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["`linear`", "`dense_relu`"]
    acc = metrics.read(tmp_path / "linear" / "metrics.jsonl")[0]["test_accuracy"]
    assert lines[2].split("|")[2].strip() == "7,850" and f"{acc:.2%}" in lines[2]
    assert (tmp_path / "report.png").stat().st_size > 10_000
