"""A command run in this process as its `python -m` would run it: (exit code, stdout, stderr)."""

from experiments import linear
from mnist_jax import cli


def stage(capsys, *argv, get_config=linear.get_config) -> tuple[int, str, str]:
    """A stage's command (linear by default): cli.run with `argv`."""
    return command(capsys, lambda args: cli.run(get_config, args), *argv)


def command(capsys, main, *argv) -> tuple[int, str, str]:
    """A command's `main(argv)`; its SystemExit's code, else its return value, else 0."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv]) or 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
