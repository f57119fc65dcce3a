"""What a run shows: summary, plots, TensorBoard logs, progress bar (issue: see training)."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import jax
import numpy as np
import pytest
from matplotlib.cbook import STEP_LOOKUP_MAP
from PIL import Image

from experiments import linear
from mnist_jax import cli, loop, metrics, plots, train
from tests.conftest import CONV_BN_TRAIN, ROOT

PLOTS = ["curves", "learning_rate", "font_digits", "test_digits", "confusion"]


@pytest.fixture(scope="module")
def plotted(trained_conv_bn):
    """The trained run's work directory with its plots drawn, as `cli.run` draws them."""
    workdir, _ = trained_conv_bn
    plots.draw_all(workdir)
    return workdir


def test_every_plot_is_a_real_png(plotted):
    workdir = plotted
    for name in PLOTS:
        path = workdir / "plots" / f"{name}.png"
        assert path.stat().st_size > 10_000, name  # an empty figure is a few KB
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 500 and image.height >= 300


def test_plots_command_redraws_from_the_work_directory(plotted, tmp_path):
    workdir = plotted
    for name in PLOTS:
        (workdir / "plots" / f"{name}.png").unlink()
    plots.main(["--workdir", str(workdir)])
    assert all((workdir / "plots" / f"{name}.png").exists() for name in PLOTS)


def test_test_digit_grid_marks_exactly_the_misrecognised(trained_conv_bn, mnist):
    workdir, state = trained_conv_bn
    out = train.eval_dataset(state, mnist.test_images, mnist.test_labels)
    predictions = np.asarray(out["predictions"])
    wrong = np.flatnonzero(predictions != mnist.test_labels)
    assert 0 < len(wrong) == round((1 - float(out["accuracy"])) * 10_000)
    shown = plots.test_digit_order(predictions, mnist.test_labels)
    red = predictions[shown] != mnist.test_labels[shown]
    k = min(len(wrong), len(shown))
    assert red[:k].all() and not red[k:].any()  # all errors first, then only correct digits
    np.testing.assert_array_equal(shown[:k], wrong[:k])
    titles = plots.digit_titles(mnist.test_labels[shown], predictions[shown])
    for i, (text, color) in zip(shown, titles):  # "guess (true)" in red for each error
        want = f"{predictions[i]} ({mnist.test_labels[i]})" if i in wrong else f"{predictions[i]}"
        assert (text, color == plots.RED) == (want, i in wrong)
    matrix = plots.confusion_matrix(predictions, mnist.test_labels)
    assert matrix.sum() == 10_000 and matrix.sum() - np.trace(matrix) == len(wrong)


def test_learning_rate_plot_drops_where_the_schedule_does(mnist_dir, tmp_path):
    # 10 steps an epoch, a row every 4: rows at steps 4, 8, 10, 14, 18, 20. The rate halves at
    # the end of epoch 1 (a per-epoch schedule: step 11 is the first at 0.005), and
    # learning_rate.png, drawn from the logged rows, must show it there, as schedule.png does
    # (drawn steps-post, it dropped at the next row, step 14: epoch 1.4).
    config = linear.get_config()
    config.update(epochs=2, batch_size=128, log_every=4)
    config.data.update(dir=str(mnist_dir), train_limit=1280, test_limit=500)
    config.opt.decay = 0.5
    loop.train_and_evaluate(config, tmp_path)
    steps = metrics.read(tmp_path / metrics.STEPS_FILE)
    assert [r["step"] for r in steps] == [4, 8, 10, 14, 18, 20]
    fig = plots.learning_rate_figure(steps, metrics.read(tmp_path / metrics.EPOCHS_FILE), "linear")
    line = fig.axes[0].lines[0]
    x, y = STEP_LOOKUP_MAP[line.get_drawstyle()](*line.get_data())  # the vertices drawn
    plots.plt.close(fig)
    first = np.flatnonzero(np.diff(y) < 0)[0]  # the first drop: from vertex first to first + 1
    assert x[first] == x[first + 1] == pytest.approx(1.0)
    assert (y[first], y[first + 1]) == pytest.approx((0.01, 0.005))


def test_a_wrong_guess_is_shown_beside_its_true_digit():
    titles = plots.digit_titles(np.array([2, 3]), np.array([7, 3]))
    assert titles == [("7 (2)", plots.RED), ("3", "black")]


def test_summary_totals_equal_the_parameter_count(trained_conv_bn):
    workdir, state = trained_conv_bn
    text = (workdir / "summary.txt").read_text()
    count = sum(x.size for x in jax.tree.leaves(state.params))
    assert f"Trainable parameters: {count:,}" in text and count == 354_002
    assert "Conv_0" in text and "BatchNorm_3" in text and "float32[1,7,7,32]" in text


def test_sampled_train_metrics_and_tensorboard(trained_conv_bn):
    workdir, _ = trained_conv_bn
    steps = metrics.read(workdir / "train_steps.jsonl")
    total = CONV_BN_TRAIN // 64  # a row every --log-every 50 steps, and the last
    assert [r["step"] for r in steps] == list(range(50, total, 50)) + [total]
    assert steps[-1]["loss"] < steps[0]["loss"]
    import tensorflow as tf

    (event_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(event_file)) for v in e.summary.value}
    assert {
        "train/loss",
        "train/learning_rate",
        "epoch/test_accuracy",
        "epoch/learning_rate",
    } <= tags


def _run_stage(tmp_path, mnist_dir, use_pty: bool, capsys=None) -> str:
    cmd = [
        sys.executable,
        "-m",
        "experiments.linear",
        "--epochs",
        "1",
        "--data-train-limit",
        "2560",
        "--log-every",
        "2",
        "--plots",
        "false",
        "--data-dir",
        str(mnist_dir),
        "--workdir",
        str(tmp_path / ("tty" if use_pty else "pipe")),
    ]
    if not use_pty:  # here, in this process: its stderr is a pipe (pytest's capture), no terminal
        capsys.readouterr()
        cli.run(linear.get_config, cmd[3:])
        return capsys.readouterr().err
    leader, follower = pty.openpty()
    # A terminal 120 columns wide: a fresh pty has none, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=300)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal(tmp_path, mnist_dir, capsys):
    bar = re.compile(r"epoch 1/1: +[0-9]+%\|.*img/s")  # tqdm's bar: percent, bar, rate
    assert bar.search(_run_stage(tmp_path, mnist_dir, use_pty=True))
    assert not bar.search(_run_stage(tmp_path, mnist_dir, use_pty=False, capsys=capsys))
