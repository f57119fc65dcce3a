"""Work directories as users type them: relative, with ~, a trailing slash, through a symlink.

Every reader (resume, evaluate, plots, predict, --init-from, mnist_jax.restore) takes each form,
and an intact checkpoint read through any of them is never moved aside as damaged.
"""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import mnist_jax
from experiments import linear
from mnist_jax import checkpoint, cli, evaluate, plots, predict
from tests.helpers import inprocess

TRAIN = ["--epochs", "1", "--data-train-limit", "2000"]


def _stage(capsys, *argv):
    return inprocess.stage(capsys, *argv)


def _command(capsys, main, *argv):
    return inprocess.command(capsys, main, *argv)


def assert_nothing_moved(workdir: Path):
    assert not (workdir / checkpoint.DAMAGED).exists(), list((workdir / checkpoint.DAMAGED).rglob("*"))  # fmt: skip
    assert checkpoint.steps(workdir), "the checkpoints are gone"


def test_default_relative_workdir_trains_twice_and_every_reader_reads_it(
    mnist_dir, mnist, tmp_path, monkeypatch, capsys
):
    """The README's way: from the repository root, `runs/<stage>` and a relative data path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_DATA_DIR", os.path.relpath(mnist_dir, tmp_path))
    first = _stage(capsys, *TRAIN)
    assert first[0] == 0, first[2]
    assert (tmp_path / "runs/linear/plots/confusion.png").is_file()
    again = _stage(capsys, *TRAIN)
    assert again[0] == 0 and "Traceback" not in again[2], again[2]
    workdir = Path("runs/linear")
    assert_nothing_moved(workdir)
    assert len(list(workdir.glob("tensorboard/events.out.tfevents.*"))) == 1  # none added, empty

    code, out, err = _command(capsys, evaluate.main, "--workdir", "runs/linear")
    assert code == 0 and "test accuracy" in out, err
    code, out, err = _command(capsys, plots.main, "--workdir", "runs/linear")
    assert code == 0 and "confusion.png" in out, err
    Image.fromarray(mnist.test_images[0, ..., 0]).save("digit.png")
    code, out, err = _command(capsys, predict.main, "--workdir", "runs/linear", "digit.png")
    assert code == 0 and "digit.png" in out, err
    restored = mnist_jax.restore("runs/linear")
    assert restored.step == checkpoint.steps(workdir)[0]
    code, out, err = _stage(capsys, *TRAIN, "--workdir", "runs/from_linear", "--init-from", "runs/linear")  # fmt: skip
    assert code == 0 and "Starting from the weights of" in out, err
    assert_nothing_moved(workdir)


@pytest.fixture(scope="module")
def trained(mnist_dir, tmp_path_factory):
    """A finished linear run, copied into each test's runs/linear."""
    workdir = tmp_path_factory.mktemp("paths") / "linear"
    argv = [*TRAIN, "--data-dir", str(mnist_dir), "--workdir", str(workdir), "--plots", "false"]
    cli.run(linear.get_config, argv)
    return workdir


FORMS = {
    "relative": "runs/linear",
    "trailing slash": "runs/linear/",
    "dot": "./runs/../runs/linear",
    "tilde": "~/runs/linear",
    "symlink": "link",
    "absolute": None,  # the test's own absolute path
}


@pytest.mark.parametrize("form", FORMS)
def test_every_reader_takes_each_path_form_and_moves_nothing(
    trained, mnist_dir, mnist, tmp_path, monkeypatch, capsys, form
):
    shutil.copytree(trained, tmp_path / "runs/linear")
    (tmp_path / "link").symlink_to(tmp_path / "runs/linear")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_dir))
    path = FORMS[form] or str(tmp_path / "runs/linear")
    Image.fromarray(mnist.test_images[0, ..., 0]).save("digit.png")
    step = checkpoint.steps(tmp_path / "runs/linear")[0]

    code, out, err = _stage(capsys, *TRAIN, "--workdir", path, "--plots", "false")
    assert code == 0 and "Traceback" not in err, err
    for main, argv in [
        (evaluate.main, ["--workdir", path]),
        (plots.main, ["--workdir", path]),
        (predict.main, ["--workdir", path, "digit.png"]),
    ]:
        code, out, err = _command(capsys, main, *argv)
        assert code == 0, (main.__module__, err)
    assert mnist_jax.restore(path).step == step
    # --init-from the same directory typed two ways is one recipe: the second resumes.
    code, out, err = _stage(capsys, *TRAIN, "--workdir", "runs/b", "--init-from", path)
    assert code == 0 and "Starting from the weights of" in out, err
    other = "runs/linear" if form != "relative" else str(tmp_path / "runs/linear/")
    code, out, err = _stage(capsys, *TRAIN, "--workdir", "runs/b", "--init-from", other)
    assert code == 0, err
    assert_nothing_moved(tmp_path / "runs/linear")


def test_a_library_bug_surfaces_and_moves_nothing(mnist_dir, tmp_path, monkeypatch, capsys):
    """An exception that says how Orbax was called (a TypeError here) is not damage."""
    workdir = tmp_path / "run"
    code, _, err = _stage(capsys, *TRAIN, "--data-dir", str(mnist_dir), "--workdir", str(workdir), "--plots", "false")  # fmt: skip
    assert code == 0, err

    def broken(self, directory):
        raise TypeError("how we called it")

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "metadata", broken)
    with pytest.raises(TypeError, match="how we called it"):
        mnist_jax.restore(workdir)
    with pytest.raises(TypeError, match="how we called it"):
        _stage(capsys, *TRAIN, "--data-dir", str(mnist_dir), "--workdir", str(workdir), "--plots", "false")  # fmt: skip
    assert_nothing_moved(workdir)
