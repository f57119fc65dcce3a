"""The README's Python examples run as written, on the real data: a user copies them first."""

import math
import re

import jax
import numpy as np
import optax
import pytest

import mnist_jax
from mnist_jax import metrics
from tests.conftest import ROOT

README_DATA_DIR = '"../shared/data/mnist"'


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def block(containing: str) -> str:
    (found,) = [b for b in python_blocks() if containing in b]
    return found


def test_research_script_example_trains(mnist_dir, capsys):
    code = block("train_step")
    # The README points at the data the way a user in the repository root would.
    assert README_DATA_DIR in code
    code = code.replace(README_DATA_DIR, repr(str(mnist_dir)))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)

    assert int(namespace["state"].step) == 100
    printed = capsys.readouterr().out
    for key in ("loss", "accuracy", "learning_rate"):
        assert f"'{key}'" in printed
    # 100 steps of conv_bn take the loss from chance (ln 10 = 2.3) to well under 1.
    loss = float(namespace["metrics"]["loss"])
    assert math.isfinite(loss) and loss < 1.0, loss


def test_restore_example_predicts_what_training_logged(trained_conv_bn, mnist):
    workdir, _ = trained_conv_bn
    code = block("mnist_jax.restore")
    assert '"runs/conv_bn"' in code
    code = code.replace('"runs/conv_bn"', repr(str(workdir)))
    namespace = {"images_uint8_Nx28x28x1": mnist.test_images}
    exec(compile(code, "README.md", "exec"), namespace)

    logits = namespace["logits"]
    assert logits.shape == (len(mnist.test_labels), 10)
    correct = int(np.sum(np.argmax(jax.device_get(logits), -1) == mnist.test_labels))
    logged = metrics.read(workdir / metrics.EPOCHS_FILE)[-1]
    assert correct / len(mnist.test_labels) == pytest.approx(logged["test_accuracy"], abs=1e-6)
    assert namespace["step"] == logged["step"]


def test_hook_example_prints_the_weight_norm_at_each_epochs_end(mnist_dir, tmp_path, capsys):
    code = block("class WeightNorm")
    assert README_DATA_DIR in code and '"runs/weight_norm"' in code
    code = code.replace(README_DATA_DIR, repr(str(mnist_dir)))
    code = code.replace('"runs/weight_norm"', repr(str(tmp_path)))
    exec(compile(code, "README.md", "exec"), {})

    printed = [line for line in capsys.readouterr().out.splitlines() if "|w|" in line]
    final = optax.tree.norm(mnist_jax.restore(tmp_path).variables["params"])
    assert printed[0].startswith("epoch 1: |w| = ") and len(printed) == 2
    assert printed[1] == f"epoch 2: |w| = {final:.3f}"
