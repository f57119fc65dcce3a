"""Beyond the codelab, conv_best: a VGG-like network of 3x3 convolutions with batch norm, rotations,
shifts and an average of the weights; its recipe chosen on a validation split (issue #45).

Changed from the speedrun (conv_bn's network, one-cycle Adam, shifts of up to 2 pixels, 6 epochs),
in two steps, each judged on 10,000 images held out of the training set (docs/results.md):
  1. a 12-trial study of 6-epoch trials on conv_bn's kind of network chose dropout 0.25, each
     training image also rotated by up to 11 degrees either way and scaled by up to 0.6%
     (train.random_warp, on the device, inside the step), a lower peak rate (0.0044) and the
     weights and batch-norm statistics averaged over the steps (EMA, decay 0.99: the average is
     what is evaluated and saved); 12 epochs;
  2. 12-epoch runs of two seeds each against that recipe (validation 99.40%, 99.42%): stronger
     scaling and shifts did not help (99.34%, 99.42%); four 3x3 convolutions, two at 28 and two
     at 14 pixels, with a dense layer of 200, in place of conv_bn's 3x3 / 6x6 / 6x6 did (99.45%,
     99.53%); with label smoothing 0.1 on top, more (99.57%, 99.51%): frozen here.

  [28x28x1] -> Conv 3x3x32 BN relu -> Conv 3x3x32 /2 BN relu -> Conv 3x3x64 BN relu
            -> Conv 3x3x64 /2 BN relu -> Dense 200 BN relu -> Dropout .25 -> Dense 10 -> softmax
  694,402 trainable params (+ 784 batch-norm statistics), about 2.2x conv_bn's work an image.
  Batch 64, one-cycle Adam to 0.0044, cross-entropy with labels smoothed by 0.1, 12 epochs.

  python -m experiments.conv_best --data-dir ../shared/data/mnist              # seed 0
  python -m experiments.conv_best --seeds 5 --data-dir ../shared/data/mnist    # seeds 0-4
  python -m experiments.conv_best --seeds 2 --data-val-split 10000 --data-dir ../shared/data/mnist  # step 2's last

The test set chose nothing. Measured: docs/results.md ("Beyond the codelab").
"""

from experiments import speedrun
from mnist_jax import cli

TARGET = 0.9965  # the final test accuracy's median over seeds 0-4 (issue #45)


def get_config():
    config = speedrun.get_config()
    config.model.update(channels=(32, 32, 64, 64), kernels=(3, 3, 3, 3), strides=(1, 2, 1, 2))  # step 2
    config.model.dropout = 0.2492  # step 1's study, trial 9
    config.loss.label_smoothing = 0.1  # step 2
    config.data.update(augment_rotate=11.09, augment_scale=0.006451)
    config.opt.update(lr=0.004426, ema=0.99)
    config.epochs = 12
    return config


def get_sweep():
    """A study's space for this network (`python -m experiments.sweep conv_best`): the four widths
    (from about conv_bn's to 1.5x this network's) and dropout, the augmentation's strength, the
    peak rate, the EMA's decay and the labels' smoothing."""
    return [
        "model.channels[0]=int(16,48)",
        "model.channels[1]=int(16,48)",
        "model.channels[2]=int(32,96)",
        "model.channels[3]=int(32,96)",
        "model.dense=choice(200,400)",
        "model.dropout=uniform(0.1,0.5)",
        "data.augment_rotate=uniform(0,15)",
        "data.augment_scale=uniform(0,0.15)",
        "opt.lr=loguniform(0.003,0.03)",
        "opt.ema=choice(0.99,0.999)",
        "loss.label_smoothing=uniform(0,0.2)",
    ]


if __name__ == "__main__":
    cli.run(get_config)
