"""The package's layers: each module imports only modules below it, read from the source with ast.

Imports inside functions count: an import that points up, even a lazy one, is a circle waiting
to happen. No jax import in this process: it reads files (one test starts a process of its own).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "mnist_jax"
# Bottom to top. A new module takes its place here, above everything it imports.
ORDER = [
    "config",
    "flags",
    "data",
    "models",
    "optim",
    "metrics",
    "parallel",
    "startup",
    "checkpoint",
    "recipe",
    "train",
    "diagnostics",
    "evaluate",
    "predict",
    "plots",
    "hooks",
    "loop",
    "seeds",
    "sweep",
    "cli",
    "__init__",
]
TRAINING_PATH = [
    "config", "flags", "data", "models", "optim", "metrics", "parallel", "startup", "checkpoint", "recipe",
    "train", "diagnostics", "hooks", "loop", "seeds", "cli",
]  # fmt: skip
HEAVY = {"matplotlib", "tensorflow", "tensorflow_datasets", "keras", "torch", "tensorboardX"}
NEVER = {"keras", "torch", "tensorflow", "experiments", "tests"}


def _names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads: ours by stem ("train"), others by package."""
    if isinstance(node, ast.Import):
        # + "__init__": `import mnist_jax` loads the package itself
        parts = [alias.name.split(".") + ["__init__"] for alias in node.names]
        return [p[1] if p[0] == "mnist_jax" else p[0] for p in parts]
    parts = (node.module or "").split(".")
    if not node.level and parts[0] != "mnist_jax":
        return [parts[0]]
    sub = parts[1:] if not node.level else [p for p in parts if p]
    if sub:  # from mnist_jax.train import x, from .train import x
        return [sub[0]]
    # from mnist_jax import train, restore: a module, or a name from the package's __init__
    return [a.name if a.name in ORDER else "__init__" for a in node.names]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import in a file, functions' included."""
    found, todo = [], [(ast.parse(path.read_text()), True)]
    while todo:
        node, top = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += [(name, top) for name in _names(node)]
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        todo += [(child, inner) for child in reversed(list(ast.iter_child_nodes(node)))]
    return found


def test_every_module_has_a_place_in_the_order():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_modules_import_only_modules_below_them(module):
    below = ORDER[: ORDER.index(module)]
    ours = [name for name, _ in imports(PACKAGE / f"{module}.py") if name in ORDER]
    assert [name for name in ours if name not in below] == [], f"{module} imports upwards"


def test_the_pure_step_imports_no_checkpoint_or_loop_code():
    ours = {name for name, _ in imports(PACKAGE / "train.py")}
    assert ours & {"checkpoint", "recipe", "hooks", "loop", "members"} == set()


@pytest.mark.parametrize("module", ORDER)
def test_no_reference_frameworks_experiments_or_tests_in_the_library(module):
    assert {name for name, _ in imports(PACKAGE / f"{module}.py")} & NEVER == set()


@pytest.mark.parametrize("module", TRAINING_PATH)
def test_heavy_imports_wait_for_the_function_that_needs_them(module):
    assert {name for name, top in imports(PACKAGE / f"{module}.py") if top} & HEAVY == set()


def test_the_checker_sees_imports_inside_functions(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text(
        "import matplotlib.pyplot as plt\nfrom mnist_jax.config import base\nclass A:\n"
        "    from . import data\ndef f():\n    from mnist_jax import loop, restore\n"
        "    import torch.nn\n"
    )
    assert imports(fake) == [
        ("matplotlib", True), ("config", True), ("data", True), ("loop", False),
        ("__init__", False), ("torch", False),
    ]  # fmt: skip


def test_writing_metrics_leaves_torch_unimported(tmp_path):
    """tensorboardX imports torch when it is installed (the `bench` extra, as in CI): 2.7 s of
    every training command's start-up. The writer must not pay it, and torch must still import
    afterwards for code that wants it. (A process of its own: this one may hold torch already.)"""
    code = (
        "import sys; from mnist_jax import metrics; w = metrics.Writer(sys.argv[1]); "
        "w.epoch({'epoch': 1, 'step': 1, 'test_accuracy': 0.5}); w.close(); "
        "print('torch' in sys.modules); import torch; print(torch.tensor([1]).item())"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "1"]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
