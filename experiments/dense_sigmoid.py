"""Stage 2, dense_sigmoid: two hidden sigmoid layers, keras_02's first try.

Changed from linear: hidden layers of 200 and 60 sigmoid units. The lesson: with plain SGD at
0.01 the sigmoids saturate and learning crawls; this stage ends clearly below dense_relu.

  [784] -> Dense 200 sigmoid -> Dense 60 sigmoid -> Dense 10 -> softmax   169,670 params
  SGD lr 0.01, batch 128, 10 epochs.

  python -m experiments.dense_sigmoid --data-dir ../shared/data/mnist

Measured (2-core CPU, seed 0, `python -m experiments.dense_sigmoid --data-dir ../shared/data/mnist`):
  final test accuracy 75.81%; 10 epochs in 12 s (training, compilation and
  evaluation).
"""

from mnist_jax import cli
from mnist_jax import config as config_lib


def get_config():
    config = config_lib.base()
    config.model = dict(name="mlp", features=(200, 60), activation="sigmoid", dropout=0.0)
    config.opt.update(name="sgd", lr=0.01, decay=1.0)
    return config


if __name__ == "__main__":
    cli.run(get_config)
