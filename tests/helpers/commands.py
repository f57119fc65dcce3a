"""Run several stage commands in this one process; print a JSON list of their results.

    python -m tests.helpers.commands '[["conv_bn", "--epochs", "1", ...], ...]'

Each item is a stage and its flags, run as `python -m experiments.<stage>` would run them; each
result is {"code", "stdout", "stderr"}. An item that names a module instead ("tests.helpers.x")
calls its `measure(*args)`, whose JSON value is the result. For tests whose commands need several (forced) devices:
XLA_FLAGS sets them before JAX starts, so they need a process, but one process start (imports, a
compile-cache read) is seconds here, and they can share it.
"""

import contextlib
import importlib
import io
import json
import sys

from mnist_jax import cli


def run(stage: str, *argv: str):
    if "." in stage:
        return importlib.import_module(stage).measure(*argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.run(importlib.import_module(f"experiments.{stage}").get_config, list(argv))
            code = 0
        except SystemExit as e:
            code = e.code
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    print(json.dumps([run(*command) for command in json.loads(sys.argv[1])]))
