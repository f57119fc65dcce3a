"""Stage 1, linear: one dense layer and a softmax, the codelab's keras_01.

  [28x28] -> flatten 784 -> Dense 10 -> softmax          7,850 params
  SGD lr 0.01, batch 128, 10 epochs.

  python -m experiments.linear --data-dir ../shared/data/mnist

Measured (2-core CPU, seed 0, `python -m experiments.linear --data-dir ../shared/data/mnist`):
  final test accuracy 89.89%; 10 epochs in 5 s (training, compilation and
  evaluation).
"""

from mnist_jax import cli
from mnist_jax import config as config_lib

TARGET = 0.89  # final test accuracy after 10 epochs (issue #2)


def get_config():
    config = config_lib.base()
    config.model = dict(name="softmax")
    config.opt.update(name="sgd", lr=0.01, decay=1.0)
    return config


if __name__ == "__main__":
    cli.run(get_config)
