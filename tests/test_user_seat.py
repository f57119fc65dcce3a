"""The README as a user runs it: from a copy of the repository root, with the default work
directories and the README's relative data path, every command as written.

Commands are shrunk only by flags appended to them (`--epochs 1 --data-train-limit ...`); a
placeholder (`--data-dir DIR`) gets a real directory; `--data-tfds` needs the network and is
left out. Each training command runs twice: the second goes on or says it is done, and nothing
is moved aside. `.ci/run` runs the quick start unshrunk after the suite.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jupytext
import numpy as np
import pytest
from PIL import Image

import mnist_jax
from experiments import sweep
from mnist_jax import metrics
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
DATA = "../shared/data/mnist"  # where the README points MNIST_DATA_DIR, from the repository root
STAGE = "--epochs 1 --data-train-limit 1024 --data-test-limit 1000"
SHRINK = {  # per command: what makes it a test-sized run of the same code
    "experiments.seeds": "--epochs 1 --train-limit 1024 --seeds 2",
    "experiments.sweep": f"{STAGE} --trials 1 --data-val-split 256",
    "experiments.speedrun": "--epochs 1 --train-limit 1024 --seeds 1",
    # Keras and PyTorch's workers: tests/test_benchmark.py, which the bench extra serves too.
    "experiments.benchmark": "--batch-sizes 64 --windows 1 --window-images 640 --frameworks mnist_jax",
}
TRAINS = ("experiments.seeds", "experiments.sweep", "experiments.speedrun")


def bash_block(heading: str) -> list[str]:
    """The command lines of the first bash block under `## heading`, comments stripped."""
    section = README.split(f"\n## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].split(" # ")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]  # fmt: skip


def quick_start() -> list[str]:
    """The quick start's two commands, each as a venv's set-up then `.venv/bin/python -m ...`."""
    return bash_block("Quick start")


def is_stage(module: str) -> bool:
    return module.removeprefix("experiments.") in sweep.stages()


def as_test(line: str) -> str | None:
    """The README's line as the test runs it; None for one that needs the network."""
    if "--data-tfds" in line:
        return None
    line = line.replace("--data-dir DIR", f"--data-dir {DATA}")
    module = line.split()[2]
    if is_stage(module) and "--help" not in line:
        extra = STAGE + (" --seeds 2" if "--seeds" in line else "")
        extra += " --data-val-split 256" if "--data-val-split" in line else ""
        return f"{line} {extra}"
    return f"{line} {SHRINK[module]}" if module in SHRINK else line


def trains(line: str) -> bool:
    module = line.split()[2]
    return "--help" not in line and (is_stage(module) or module in TRAINS)


@pytest.fixture(scope="module")
def repo(mnist_dir, tmp_path_factory):
    """A copy of the repository root, with ../shared/data/mnist beside it as in the README."""
    top = tmp_path_factory.mktemp("user")
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache")  # fmt: skip
    shutil.copytree(ROOT, top / "mnist_jax", ignore=skip)
    (top / "shared" / "data").mkdir(parents=True)
    (top / "shared" / "data" / "mnist").symlink_to(mnist_dir)
    return top / "mnist_jax"


def user_env() -> dict:
    return {**os.environ, "MNIST_DATA_DIR": DATA, "PYTHONPATH": ""}


def run_lines(repo: Path, lines: list[str]) -> list[dict]:
    """Each line as `python -m` runs it from the repository root, in one process."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.user", json.dumps(lines)],
        cwd=repo, env=user_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_ok(result: dict):
    where = f"{result['line']}\n{result['stderr'][-2000:]}"
    assert result["code"] == 0 and "Traceback" not in result["stderr"], where


def nothing_moved(repo: Path):
    assert not list((repo / "runs").rglob("damaged")), list((repo / "runs").rglob("damaged"))


@pytest.fixture(scope="module")
def quick_started(repo, mnist):
    """README command 1 (the quick start), shrunk, twice; my_digit.png from a test digit."""
    command = quick_start()[0]
    assert "export MNIST_DATA_DIR=../shared/data/mnist" in README
    python = command.rsplit("&& ", 1)[1]
    assert python == ".venv/bin/python -m experiments.conv_bn", python
    line = as_test(python.replace(".venv/bin/python", "python"))
    Image.fromarray(mnist.test_images[0, ..., 0]).save(repo / "my_digit.png")
    return run_lines(repo, [line, line])


def test_quick_start_twice_then_evaluate_plots_predict(repo, quick_started, mnist):
    first, again = quick_started
    assert_ok(first)
    assert "Plots in runs/conv_bn/plots" in first["stdout"]
    assert_ok(again)
    assert "runs/conv_bn: trained to epoch 1 already" in again["stdout"], again["stdout"]
    assert (repo / "runs/conv_bn/plots/confusion.png").is_file()
    commands = [c for c in bash_block("Commands") if "runs/conv_bn" in c and "mnist_jax." in c]
    assert [c.split()[2] for c in commands] == ["mnist_jax.evaluate", "mnist_jax.plots", "mnist_jax.predict"]  # fmt: skip
    evaluated, plotted, predicted = run_lines(repo, commands)
    for result in (evaluated, plotted, predicted):
        assert_ok(result)
    logged = metrics.read(repo / "runs/conv_bn" / metrics.EPOCHS_FILE)[-1]
    assert f"test accuracy {logged['test_accuracy']:.2%}" in evaluated["stdout"]
    said = predicted["stdout"]
    assert re.fullmatch(r"my_digit.png: \d \(\d+\.\d%\)\n", said), said  # it names a digit
    nothing_moved(repo)


def test_every_readme_command_runs_as_written(repo, quick_started):
    """The Commands and "Your own data" blocks, in order; a training command twice."""
    lines = []
    for line in bash_block("Commands") + bash_block("Your own data"):
        shrunk = as_test(line)
        if shrunk is None or line.split()[2].startswith("mnist_jax."):  # the network; readers: above
            continue
        lines += [shrunk, shrunk] if trains(line) else [shrunk]
    results = run_lines(repo, lines)
    print("\n".join(f"{r['seconds']:6.1f} s  {r['line']}" for r in results))
    for result in results:
        assert_ok(result)
    seen = {}
    for result in results:
        if result["line"] in seen and trains(result["line"]):
            assert "Traceback" not in result["stderr"]
        seen[result["line"]] = result
    assert "--data-" in seen[as_test("python -m experiments.conv_bn --help")]["stdout"]
    nothing_moved(repo)


def test_readme_research_script_runs_as_written(repo, monkeypatch, capsys):
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "train_step" in b]
    monkeypatch.chdir(repo)
    exec(compile(code, "README.md", "exec"), namespace := {})
    assert int(namespace["state"].step) == 100
    printed = capsys.readouterr().out
    assert all(f"'{key}'" in printed for key in ("loss", "accuracy", "learning_rate"))
    loss = float(namespace["metrics"]["loss"])  # from chance (ln 10 = 2.3) to well under 1
    assert np.isfinite(loss) and loss < 1.0, loss


def test_readme_restore_example_predicts_what_training_logged(repo, quick_started, mnist, monkeypatch):  # fmt: skip
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "mnist_jax.restore" in b]  # fmt: skip
    monkeypatch.chdir(repo)
    namespace = {"images_uint8_Nx28x28x1": mnist.test_images[:1000]}  # the test run's 1,000
    exec(compile(code, "README.md", "exec"), namespace)
    logits = jax.device_get(namespace["logits"])
    logged = metrics.read(repo / "runs/conv_bn" / metrics.EPOCHS_FILE)[-1]
    correct = np.mean(np.argmax(logits, -1) == mnist.test_labels[:1000])
    assert correct == pytest.approx(logged["test_accuracy"], abs=1e-6)
    assert namespace["step"] == logged["step"]


def test_readme_hook_example_runs_as_written(repo, monkeypatch, capsys):
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "class WeightNorm" in b]  # fmt: skip
    monkeypatch.chdir(repo)
    exec(compile(code, "README.md", "exec"), {})
    printed = [line for line in capsys.readouterr().out.splitlines() if "|w|" in line]
    import optax

    final = optax.tree.norm(mnist_jax.restore("runs/weight_norm").variables["params"])
    assert printed[0].startswith("epoch 1: |w| = ") and len(printed) == 2
    assert printed[1] == f"epoch 2: |w| = {final:.3f}"


def test_notebook_runs_as_a_user_opens_it(repo):
    """jupytext executes it as the README says: its kernel in notebooks/, the default work
    directory, MNIST_DATA_DIR relative to the repository root."""
    (command,) = [c for c in bash_block("The notebook") if "jupytext" in c]
    env = {**user_env(), "MNIST_JAX_NOTEBOOK_SMALL": "1"}
    argv = command.replace(".venv/bin/", "").split()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / argv[0]), *argv[1:]],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    notebook = jupytext.read(repo / "notebooks" / "codelab.ipynb")
    code = [c for c in notebook.cells if c.cell_type == "code"]
    where = lambda text: next(i for i, c in enumerate(code) if text in c.source)  # noqa: E731
    images = lambda c: [o for o in c.outputs if "image/png" in o.get("data", {})]  # noqa: E731
    schedule, training = where("plots.schedule("), where("loop.train(")
    assert schedule < training and images(code[schedule]), "the schedule is drawn before training"  # fmt: skip
    printed = "".join(o.get("text", "") for o in code[training].outputs)
    draws = int(printed.split("the curves were redrawn ")[1].split()[0])
    assert draws > 2 and images(code[training]), printed  # more than once an epoch, 2 epochs
    assert images(code[where("plots.draw_all(")]) and images(code[where("data.from_config(")])
    assert (repo / "runs" / "notebook_dense_relu" / "plots" / "confusion.png").is_file()
