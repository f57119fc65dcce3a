# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # TensorFlow, Keras and deep learning, without a PhD, in JAX
#
# The codelab's path with this project's library: the data, the model, the learning-rate
# schedule, training with curves that move, and the digits it gets wrong. Each stage of the
# codelab is a config (`experiments/<stage>.py`); change `STAGE` to walk the path, from
# `linear` to `conv_bn`. Run it as the README says (`jupytext --execute`), open it in Jupyter
# Lab (the `notebook` extra), or `jupytext --to ipynb` it for Colab.

# %%
# In Colab: install the project from your copy of it (elsewhere this cell does nothing).
import subprocess
import sys

if "google.colab" in sys.modules:
    REPO = ""  # your repository's pip address, e.g. "git+https://github.com/<you>/mnist_jax"
    if not REPO:
        raise SystemExit("set REPO to the address of your copy of the project, then run again")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", REPO], check=True)

# %%
# Parameters. The test suite runs this notebook on a small budget (MNIST_JAX_NOTEBOOK_SMALL=1).
import os
from pathlib import Path

# Work from the repository root, as every command does: runs/ and a relative $MNIST_DATA_DIR
# mean the same here as in a shell there (Jupyter starts the kernel in notebooks/).
if Path.cwd().name == "notebooks" and (Path.cwd().parent / "mnist_jax").is_dir():
    os.chdir(Path.cwd().parent)

SMALL = os.environ.get("MNIST_JAX_NOTEBOOK_SMALL") == "1"
STAGE = "dense_relu" if SMALL else "conv_bn"
WORKDIR = f"runs/notebook_{STAGE}"

# %%
import importlib
import io

import matplotlib.pyplot as plt
from IPython.display import Image, display

from mnist_jax import data, hooks, loop, models, plots, train

config = importlib.import_module(f"experiments.{STAGE}").get_config()
config.name = STAGE
if SMALL:  # a few hundred steps: what the test needs to see, not a result
    # a sync every 2 steps on any backend (a GPU's default is a call an epoch): curves that move
    config.epochs, config.log_every, config.steps_per_call = 2, 2, 2
    config.data.update(train_limit=2000, test_limit=1000, val_split=1000)

# %% [markdown]
# ## The data
# 60,000 training and 10,000 test images of 28x28 grey pixels: from `$MNIST_DATA_DIR` (IDX
# files) when set, else from TensorFlow Datasets.

# %%
ds = data.from_config(config.data)
print(f"{len(ds.train_labels):,} training and {len(ds.test_labels):,} test images, {ds.num_classes} classes, from {ds.source}")  # fmt: skip
fig, axes = plt.subplots(1, 10, figsize=(12, 1.6))
for ax, image, label in zip(axes, ds.train_images[:10], ds.train_labels[:10]):
    ax.imshow(image[..., 0], cmap="gray_r")
    ax.set_title(int(label))
    ax.axis("off")
png = io.BytesIO()  # the library draws off screen (Agg): figures are shown as images
fig.savefig(png, format="png")
plt.close(fig)
display(Image(png.getvalue()))

# %% [markdown]
# ## The model
# Keras's `model.summary()`: each layer, its output shape and its parameters.

# %%
print(models.summary(train.model_of(config), ds.train_images.shape[1:]))

# %% [markdown]
# ## The learning-rate schedule, before training
# The codelab's `plot_learning_rate(lr_decay, EPOCHS)`: drawn from the schedule itself.

# %%
steps_per_epoch = len(loop.split_data(ds, config)["train"][1]) // config.batch_size
Path(WORKDIR, "plots").mkdir(parents=True, exist_ok=True)
plots.schedule(config, steps_per_epoch, Path(WORKDIR, "plots", "schedule.png"))
display(Image(filename=f"{WORKDIR}/plots/schedule.png"))

# %% [markdown]
# ## Training, with curves that move
# The codelab's `PlotTraining` callback: loss and accuracy, train and validation (and test),
# redrawn as the model trains. `hooks.LiveCurves` redraws them at each host sync (every
# `log_every` steps on a CPU) within a time budget, and at each epoch's end. Running this cell
# again resumes the run in `WORKDIR`.

# %%
live = hooks.LiveCurves(inline=True, budget=None if SMALL else 0.05)
run = loop.train(config, [WORKDIR], hooks=[live])
print(f"the curves were redrawn {live.draws} times in {config.epochs} epochs ({live.spent:.1f} s of drawing)")  # fmt: skip
if SMALL:
    assert live.draws > config.epochs, "the curves should move within an epoch"

# %% [markdown]
# ## The digits it gets wrong
# Test images with the model's predictions, misrecognised first (in red, the truth in
# brackets), and the confusion matrix.

# %%
paths = plots.draw_all(WORKDIR)
for name in ("test_digits", "confusion"):
    display(Image(filename=str(next(p for p in paths if p.stem == name))))
print(f"final test accuracy {run.runs[0].row['test_accuracy']:.2%}")
