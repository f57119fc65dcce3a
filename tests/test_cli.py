"""The command line: flags from the config, one-line errors with exit status 2."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run(*args, env_dir=None):
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_help_lists_every_config_field():
    out = run("experiments.conv_bn", "--help").stdout
    for flag in (
        "--epochs",
        "--batch-size",
        "--seed",
        "--data-dir",
        "--workdir",
        "--model-dropout",
        "--model-channels",
        "--opt-lr",
        "--opt-decay",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
        (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
        (["--opt-lr", "-1"], "--opt-lr: must be positive"),
        (["--model-dropout", "1.5"], "--model-dropout: must be in [0, 1)"),
        (["--model-name", "resnet"], "--model-name: must be one of softmax, mlp, conv"),
        (["--no-such-option", "1"], "unrecognized arguments: --no-such-option 1"),
        (["--batch-size", "70000"], "--batch-size: 70000 is larger than the 60000 training images"),
        (["--data-dir", "/nonexistent"], "/nonexistent: directory not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(mnist_dir, tmp_path, args, message):
    argv = ["--data-dir", str(mnist_dir), "--workdir", str(tmp_path / "w"), *args]
    result = run("experiments.dense_dropout", *argv)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_workdir_that_is_a_file(mnist_dir, tmp_path):
    (tmp_path / "f").write_text("")
    result = run(
        "experiments.linear", "--data-dir", str(mnist_dir), "--workdir", str(tmp_path / "f")
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --workdir {tmp_path / 'f'}: is a file, not a directory"


def test_evaluate_without_a_run(tmp_path):
    result = run("mnist_jax.evaluate", "--workdir", str(tmp_path))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'config.json'}: not found; is {tmp_path} a training work directory?"
    )


def test_workdir_that_cannot_be_created(mnist_dir, tmp_path):
    (tmp_path / "f").write_text("")
    workdir = tmp_path / "f" / "run"  # a path through a regular file: no directory can be made
    result = run("experiments.linear", "--data-dir", str(mnist_dir), "--workdir", str(workdir))
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: --workdir {workdir}: cannot write there (")
