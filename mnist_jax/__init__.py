"""mnist_jax: the codelab "TensorFlow, Keras and deep learning, without a PhD" in JAX + Flax.

Modules, bottom to top (each imports only modules before it here; tests/test_layers.py checks):
config, flags, data, models, optim (optimizers, schedules, losses), metrics, parallel, startup
(the process's set-up, the backend's choices), checkpoint, recipe (a run against the command
that starts it again), train (state and pure steps), members (the runs trained together),
diagnostics, evaluate / predict / plots (commands over a work directory), hooks, loop (a run
from its set-up to its end), seeds (--seeds N), timing, cli.
"""

from mnist_jax.checkpoint import restore
from mnist_jax.loop import train_and_evaluate
from mnist_jax.train import TrainState, create_train_state, eval_step, train_step

__all__ = ["TrainState", "create_train_state", "eval_step", "restore", "train_and_evaluate", "train_step"]
