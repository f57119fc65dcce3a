"""Run command lines as `python -m` runs them, in this one process, from the working directory.

    python -m tests.helpers.user '["python -m experiments.linear --epochs 1", ...]'

Prints a JSON list of {"line", "code", "stdout", "stderr"}. One process start for many commands:
each is `runpy.run_module(..., run_name="__main__")` with its sys.argv, as the interpreter does.
"""

import contextlib
import io
import json
import runpy
import shlex
import sys
import time
import traceback


def run(line: str) -> dict:
    argv = shlex.split(line)
    assert argv[:2] == ["python", "-m"], line
    module, args = argv[2], argv[3:]
    out, err, saved = io.StringIO(), io.StringIO(), sys.argv
    sys.argv, start = [module, *args], time.perf_counter()
    sys.modules.pop(module, None)  # as a fresh `python -m` would, it runs the module anew
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:  # what a user would see: the traceback, exit 1
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = saved
    seconds = round(time.perf_counter() - start, 1)
    return {"line": line, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "seconds": seconds}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps([run(line) for line in json.loads(sys.argv[1])]))
