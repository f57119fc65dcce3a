"""mnist_jax: the codelab "TensorFlow, Keras and deep learning, without a PhD" in JAX + Flax.

Modules, bottom to top (each imports only modules before it here; tests/test_layers.py checks):
config, flags, data, models, metrics, parallel, checkpoint, recipe (a run against the command
that starts it again), train (state and pure steps),
diagnostics (collapse, dead units), evaluate / predict / plots (commands over a work directory),
runs (a run's set-up and checkpointed progress), loop (the training loop), seeds (--seeds N),
timing, cli.
"""

from mnist_jax.checkpoint import restore
from mnist_jax.loop import train_and_evaluate
from mnist_jax.train import TrainState, create_train_state, eval_step, train_step

__all__ = [
    "TrainState",
    "create_train_state",
    "eval_step",
    "restore",
    "train_and_evaluate",
    "train_step",
]
