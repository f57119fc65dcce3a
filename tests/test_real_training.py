"""One full epoch on the real 60,000 training images, evaluated on all 10,000 test images."""

from experiments import dense_relu
from mnist_jax import loop, metrics


def test_dense_relu_one_epoch(mnist_dir, tmp_path):
    config = dense_relu.get_config()
    config.data.dir = str(mnist_dir)
    config.epochs = 1
    config.plots = False
    loop.train_and_evaluate(config, tmp_path)
    (row,) = metrics.read(tmp_path / "metrics.jsonl")
    assert row["step"] == 60_000 // 128
    assert row["val_accuracy"] >= 0.95


def test_conv_bn_one_epoch(trained_conv_bn):
    workdir, _ = trained_conv_bn
    (row,) = metrics.read(workdir / "metrics.jsonl")
    assert row["step"] == 60_000 // 64
    assert row["val_accuracy"] >= 0.985
