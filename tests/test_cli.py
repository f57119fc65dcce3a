"""The command line: flags from the config, one-line errors with exit status 2.

Each command runs in this process (`cli.run`, `evaluate.main`): what it prints and the status it
exits with are the same as from a shell, without a Python start-up per case.
"""

import re

import pytest

from experiments import conv_bn, dense_dropout, linear
from mnist_jax import cli, evaluate, flags
from mnist_jax import config as config_lib


def exits(capsys, command, argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of command(argv), which must exit."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        command(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def stage(get_config):
    return lambda argv: cli.run(get_config, argv)


def test_help_lists_every_config_field(capsys):
    code, out, _ = exits(capsys, stage(conv_bn.get_config), ["--help"])
    assert code == 0
    # The fields come from the config itself: a field added to it must show up here too.
    fields = [path for path, _ in flags.leaves(conv_bn.get_config()) if path != "name"]
    assert len(fields) > 20 and "model.dropout" in fields and "opt.lr" in fields, fields
    listed = set(re.findall(r"^\s+(--[a-z0-9-]+)", out, re.M))  # each option's own help line
    missing = [f for f in fields if config_lib.flag_name(f) not in listed]
    assert not missing, missing
    assert "--workdir" in listed  # the command's own, not a config field


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
        (["--xla-cpu", "fast"], "--xla-cpu: must be one of auto, default, ynn-no-conv, got 'fast'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(mnist_dir, tmp_path, args, message, capsys):
    argv = ["--data-dir", str(mnist_dir), "--workdir", str(tmp_path / "w"), *args]
    code, _, err = exits(capsys, stage(dense_dropout.get_config), argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_workdir_that_is_a_file(mnist_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    argv = ["--data-dir", str(mnist_dir), "--workdir", str(tmp_path / "f")]
    code, _, err = exits(capsys, stage(linear.get_config), argv)
    assert code == 2
    assert err.strip() == f"error: --workdir {tmp_path / 'f'}: is a file, not a directory"


def test_evaluate_without_a_run(tmp_path, capsys):
    code, _, err = exits(capsys, evaluate.main, ["--workdir", str(tmp_path)])
    assert code == 2
    assert err.strip() == f"error: {tmp_path / 'config.json'}: not found; is {tmp_path} a training work directory?"


def test_workdir_that_cannot_be_created(mnist_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    workdir = tmp_path / "f" / "run"  # a path through a regular file: no directory can be made
    argv = ["--data-dir", str(mnist_dir), "--workdir", str(workdir)]
    code, _, err = exits(capsys, stage(linear.get_config), argv)
    assert code == 2
    assert err.strip().startswith(f"error: --workdir {workdir}: cannot write there (")


def test_xla_cpu_after_jax_started_is_one_line(mnist_dir, tmp_path, capsys, monkeypatch):
    """XLA reads XLA_FLAGS once: asking for a setting too late must say so, not train without it."""
    import jax

    jax.devices()  # this test process's backend has started
    monkeypatch.setenv("XLA_FLAGS", "")
    argv = ["--data-dir", str(mnist_dir), "--workdir", str(tmp_path / "w"), "--xla-cpu", "ynn-no-conv"]  # fmt: skip
    code, _, err = exits(capsys, stage(linear.get_config), argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--xla-cpu ynn-no-conv: JAX's backend has already started" in lines[0]
    assert not (tmp_path / "w").exists()  # nothing trained
