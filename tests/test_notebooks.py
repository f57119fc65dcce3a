"""Every notebook in notebooks/ runs, top to bottom, on a small budget (a parameter it reads)."""

import os

import jupytext
import nbclient
import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_live_curves_and_the_schedule_first(path, mnist_dir, tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv("MNIST_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MNIST_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    notebook = jupytext.read(path)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()  # fmt: skip
    code = [c for c in notebook.cells if c.cell_type == "code"]
    where = lambda text: next(i for i, c in enumerate(code) if text in c.source)  # noqa: E731
    images = lambda c: [o for o in c.outputs if "image/png" in o.get("data", {})]  # noqa: E731
    schedule, training = where("plots.schedule("), where("loop.train(")
    assert schedule < training and images(code[schedule]), "the schedule is drawn before training"  # fmt: skip
    printed = "".join(o.get("text", "") for o in code[training].outputs)
    assert "the curves were redrawn" in printed and images(code[training])
    draws = int(printed.split("the curves were redrawn ")[1].split()[0])
    assert draws > 2, printed  # more than once an epoch (2 epochs); the notebook asserts it too
    assert images(code[where("plots.draw_all(")]) and images(code[where("data.from_config(")])
