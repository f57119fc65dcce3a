"""Stage 7, conv_dropout: dropout where the parameters are, keras_04's last model.

Changed from conv: Dropout 0.4 before the last dense layer, whose 313,800 weights are nine in
ten of the network's; it narrows the train/test gap.

  [28x28x1] -> Conv 3x3x12 relu -> Conv 6x6x24 /2 relu -> Conv 6x6x32 /2 relu
            -> Dense 200 relu -> Dropout .4 -> Dense 10 -> softmax        354,002 params
  Adam lr 0.01 * 0.6^epoch, batch 128, 10 epochs.

  python -m experiments.conv_dropout --data-dir ../shared/data/mnist

Measured (2-core CPU, commit 50e8fd9): final test accuracy 98.99%, best 99.00% (epoch 5);
  10 epochs in 269 s (training, compilation and evaluation). Under the 99.1% target with seed 0.
  Seeds 0-19 (CPU, `python -m experiments.seeds conv_dropout --seeds 20`; seeds 0-5 ran at commit
  70d8bb9, 6-9 at b80e7c2, 10-19 at bb681d8, the same training code): 99.17% median, 11 of 20 at
  or over 99.1%; seed 17 collapsed to 11.35%, the other 19 give 99.12% mean, 0.19% std. Seed 0
  lost 19 of its second convolution's 24 channels, seed 6 (98.62%) 23 (README, "One seed is one
  draw"). Over 26 seeds on an H100 before Keras's Adam: 3 collapsed to 11.35%, the others 99.11%
  mean; Keras's own fit: 99.10%.
"""

from experiments import conv
from mnist_jax import cli

TARGET = 0.991  # final test accuracy after 10 epochs (issue #2)


def get_config():
    config = conv.get_config()
    config.model.dropout = 0.4
    return config


if __name__ == "__main__":
    cli.run(get_config)
