"""Stage 5, dense_dropout: dropout against overfitting, keras_03's last try.

Changed from dense_lr_decay: a third hidden layer and Dropout 0.25 after each hidden layer. The
lesson: the train/test gap narrows, but a dense net throws away the image's 2-D structure, and
dropout cannot give it back; accuracy stays near 98%.

  [784] -> (Dense 200 relu, Dropout .25) -> (Dense 100 relu, Dropout .25)
        -> (Dense 60 relu, Dropout .25) -> Dense 10 -> softmax          183,770 params
  Adam lr 0.01 * 0.6^epoch, batch 128, 10 epochs.

  python -m experiments.dense_dropout --data-dir ../shared/data/mnist

Measured (2-core CPU, seed 0, `python -m experiments.dense_dropout --data-dir ../shared/data/mnist`):
  final test accuracy 97.87%; 10 epochs in 16.3 s on a loaded machine (training, compilation and
  evaluation).
"""

from mnist_jax import cli
from mnist_jax import config as config_lib

TARGET = 0.975  # final test accuracy after 10 epochs (issue #2)


def get_config():
    config = config_lib.base()
    config.model = dict(name="mlp", features=(200, 100, 60), activation="relu", dropout=0.25)
    config.opt.update(name="adam", lr=0.01, decay=0.6)
    return config


if __name__ == "__main__":
    cli.run(get_config)
