"""Every stage runs end to end (a few steps, real data) through its own command-line entry point."""

import importlib
import re

import jax
import numpy as np
import pytest

import mnist_jax
from experiments import conv_best, speedrun
from mnist_jax import cli, diagnostics, flags, metrics, predict
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
    # Whether this draw collapses is the draw's (a model may also predict one class at epoch 1
    # and recover): both cases, each for sure, test_collapse_warning_warns_once_*.
    if diagnostics.collapsed_to(predictions.argmax(-1)) is not None:
        assert warnings, err
    for epoch, label, accuracy in warnings:
        logged = rows[int(epoch) - 1]["test_accuracy"]
        assert f"{logged:.2%}" == f"{accuracy}%" and logged * 500 == pytest.approx((labels == int(label)).sum())  # fmt: skip


def test_collapse_warning_warns_once_for_a_collapsed_member_and_never_for_another(capsys):
    """The hook on a fabricated evaluation: member 0 predicts class 1 for every image, with a
    layer all dead; member 1 predicts several classes. Two epochs. (A real collapse, conv's seed
    21: test_seeds.test_collapsed_runs_are_counted_apart.)"""
    from types import SimpleNamespace

    from mnist_jax import hooks

    predictions = np.array([[1] * 6, [1, 1, 2, 3, 1, 1]])
    alive = {"hidden_0": np.array([[False] * 4, [True, False, True, True]]),
             "hidden_1": np.array([[True, False], [True, True]])}  # fmt: skip
    evaluation = {"test": {"predictions": predictions, "alive": alive}}
    group = SimpleNamespace(label=lambda i: f"seed {i}: ")
    runs = [SimpleNamespace(index=i, primary=True, group=group, config=SimpleNamespace(model={})) for i in (0, 1)]
    hook = hooks.CollapseWarning()
    for epoch in (1, 2):
        for run, accuracy in zip(runs, (0.5, 0.75)):
            mine = {"test": jax.tree.map(lambda v: v[run.index], evaluation["test"])}  # noqa: B023
            hook.on_epoch_end(run, {"epoch": epoch, "test_accuracy": accuracy}, mine)
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "seed 0: warning: epoch 1: the model predicts class 1 for every test image (test_acc "
        "50.00%); dead ReLU units (0 on every test image): hidden_0 4/4, hidden_1 1/2. A layer "
        "all 0 passes neither signal nor gradient: try another --seed or a smaller --opt-lr"
    ], err


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


def test_conv_best_is_the_speedrun_with_the_choices_made_on_validation():
    """Beyond the codelab: the speedrun's config with what was chosen on validation (docs/results.md):
    its sweep space's fields, the four 3x3 convolutions, and 12 epochs; nothing else differs."""
    best, base = dict(flags.leaves(conv_best.get_config())), dict(flags.leaves(speedrun.get_config()))
    changed = {path: value for path, value in best.items() if base[path] != value}
    assert best.keys() == base.keys()
    space = {name.split("=")[0].split("[")[0] for name in conv_best.get_sweep()}
    assert set(changed) == (space - {"model.dense"}) | {"model.kernels", "model.strides", "epochs"}
    assert changed["epochs"] == 12 and best["model.dense"] == 200  # the speedrun's dense layer, kept
    assert tuple(changed["model.channels"]) == (32, 32, 64, 64) and tuple(changed["model.kernels"]) == (3, 3, 3, 3)
    assert changed["opt.ema"] == 0.99 and changed["loss.label_smoothing"] == 0.1
    assert "python -m experiments.conv_best --seeds 5 --data-dir ../shared/data/mnist" in conv_best.__doc__
