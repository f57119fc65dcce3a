"""mnist_jax: the codelab "TensorFlow, Keras and deep learning, without a PhD" in JAX + Flax."""

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
