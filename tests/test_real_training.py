"""One full epoch on the real 60,000 training images, evaluated on all 10,000 test images."""

import pytest

from experiments import conv_bn, dense_relu
from mnist_jax import metrics, train


@pytest.mark.parametrize("stage,target", [(dense_relu, 0.95), (conv_bn, 0.985)])
def test_one_epoch_reaches_target(stage, target, mnist_dir, tmp_path):
    config = stage.get_config()
    config.data.dir = str(mnist_dir)
    config.epochs = 1
    train.train_and_evaluate(config, tmp_path)
    (row,) = metrics.read(tmp_path / "metrics.jsonl")
    assert row["step"] == 60_000 // config.batch_size
    assert row["val_accuracy"] >= target
