"""Stage 7, conv_dropout: dropout where the parameters are, keras_04's last model.

Changed from conv: Dropout 0.4 before the last dense layer, whose 313,800 weights are nine in
ten of the network's; it narrows the train/test gap.

  [28x28x1] -> Conv 3x3x12 relu -> Conv 6x6x24 /2 relu -> Conv 6x6x32 /2 relu
            -> Dense 200 relu -> Dropout .4 -> Dense 10 -> softmax        354,002 params
  Adam lr 0.01 * 0.6^epoch, batch 128, 10 epochs.

  python -m experiments.conv_dropout --data-dir ../shared/data/mnist

Measured (2-core CPU, after commit 826e91b): final test accuracy 98.97%, best 99.00%
  (epoch 7); 10 epochs in 321 s (training, compilation and evaluation). Under the 99.1% target
  with seed 0; seed 1 reached 99.19% at commit 2145e26 (README).
"""

from experiments import conv
from mnist_jax import cli

TARGET = 0.991  # final test accuracy after 10 epochs (issue #2)


def get_config():
    c = conv.get_config()
    c.model.dropout = 0.4
    return c


if __name__ == "__main__":
    cli.run(get_config)
