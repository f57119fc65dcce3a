"""Any image-classification data, and a validation split that makes every choice."""

import gzip
import json

import numpy as np
import pytest
from PIL import Image

import mnist_jax
from experiments import conv, dense_relu
from mnist_jax import cli, data, evaluate, loop, metrics, plots, predict


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes: magic 0x08 and the number of dimensions, then each one."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(header + array.tobytes()))


def learnable(n: int, shape: tuple, classes: int, seed: int):
    """Images whose class is a bright patch at its own place (and, in colour, its own colour),
    under noise: learnable in a few epochs, never by chance."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 90, (n, *shape)).astype(np.uint8)
    h, w = shape[:2]
    for k in range(classes):
        r, c = divmod(k, 4)
        rows, cols = slice(r * h // 4, (r + 1) * h // 4), slice(c * w // 4, (c + 1) * w // 4)
        patch = images[labels == k][:, rows, cols]
        images[labels == k, rows, cols] = np.maximum(patch, 200 if len(shape) == 2 else [200, 40 * (k % 5), 255 - 20 * k])  # fmt: skip
    return images, labels


def idx_dir(tmp_path, shape, classes):
    tmp_path.mkdir()
    for split, n, seed in (("train", 512, 0), ("t10k", 500, 1)):
        images, labels = learnable(n, shape, classes, seed)
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels)
    return tmp_path


@pytest.mark.parametrize("shape,classes", [((8, 8), 4), ((32, 32, 3), 10)])
def test_idx_files_of_any_shape_train_a_conv_stage_and_every_command_reads_them(shape, classes, tmp_path, capsys):  # fmt: skip
    source = idx_dir(tmp_path / "data", shape, classes)
    work = tmp_path / "run"
    cli.run(conv.get_config, ["--data-dir", str(source), "--workdir", str(work), "--epochs", "2",
            "--batch-size", "64", "--opt-lr", "0.003"])  # fmt: skip
    rows = metrics.read(work / "metrics.jsonl")
    # Chance is 1/classes. 16 steps (512 images, 2 epochs) are enough: seeds 0-4 gave 100% on
    # the 500 test images for both shapes; 95% leaves room for a machine's rounding.
    assert rows[-1]["test_accuracy"] >= 0.95
    recorded = json.loads((work / "config.json").read_text())["dataset"]
    channels = shape[2] if len(shape) == 3 else 1
    assert recorded["image_shape"] == [*shape[:2], channels] and recorded["num_classes"] == classes
    assert recorded["digits"] is False and recorded["num_train"] == 512

    restored = mnist_jax.restore(work)
    # evaluate reads the run's own test files (evaluate = the logged accuracy: test_checkpoint.py)
    assert evaluate.evaluate_checkpoint(work)["num_examples"] == 500
    drawn = sorted(p.name for p in (work / "plots").iterdir())
    assert drawn == [
        "confusion.png",
        "curves.png",
        "learning_rate.png",
        "schedule.png",
        "test_images.png",
    ]
    if channels == 3:  # in colour
        grid = np.asarray(Image.open(work / "plots" / "test_images.png").convert("RGB"), int)
        assert (np.abs(grid[..., 0] - grid[..., 1]) > 60).mean() > 0.01
    # predict: a user's picture, resized to the data's shape, as the model sees the data
    images, labels = learnable(1, shape, classes, seed=7)
    picture = Image.fromarray(images[0]).resize((5 * shape[1], 5 * shape[0]), Image.NEAREST)
    picture.save(tmp_path / "mine.png")
    capsys.readouterr()
    assert predict.main(["--workdir", str(work), str(tmp_path / "mine.png")]) == 0
    line = capsys.readouterr().out.strip()
    prepared = predict.load_image(tmp_path / "mine.png", recorded["image_shape"], digits=False)
    expected = int(predict.probabilities(restored, prepared[None]).argmax())
    assert line.startswith(f"{tmp_path / 'mine.png'}: {expected} (")


def test_a_tfds_dataset_by_name_wins_over_the_data_directory(mnist_dir, tmp_path, monkeypatch, capsys):  # fmt: skip
    """--data-tfds cifar10, 32x32x3, through TFDS's mock data; $MNIST_DATA_DIR is set (as CI
    sets it) and must not be read instead."""
    import tensorflow_datasets as tfds

    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_dir))
    with tfds.testing.mock_data(num_examples=256):
        cli.run(dense_relu.get_config, ["--data-tfds", "cifar10", "--epochs", "1", "--batch-size",
                "64", "--workdir", str(tmp_path)])  # fmt: skip
    recorded = json.loads((tmp_path / "config.json").read_text())["dataset"]
    assert recorded["source"] == "tfds cifar10" and recorded["image_shape"] == [32, 32, 3]
    assert recorded["num_classes"] == 10 and recorded["num_train"] == 256
    assert mnist_jax.restore(tmp_path).model.num_classes == 10
    assert (tmp_path / "plots" / "test_images.png").exists()


def split_of(config):
    ds = data.from_config(config.data)
    return loop.split_data(ds, config), ds


def test_the_validation_split_is_held_out_the_same_for_every_seed(mnist_dir):
    config = dense_relu.get_config()
    config.data.dir, config.data.val_split = str(mnist_dir), 5000
    arrays, ds = split_of(config)
    (x, y), (vx, vy) = arrays["train"], arrays["val"]
    assert len(vy) == 5000 and len(y) == 55_000 and len(arrays["test"][1]) == 10_000
    # disjoint, and together the training set: every training image is in exactly one of them
    as_rows = lambda a: {bytes(r) for r in a.reshape(len(a), -1)}  # noqa: E731
    assert not as_rows(x) & as_rows(vx)
    assert sorted(as_rows(x) | as_rows(vx)) == sorted(as_rows(ds.train_images))
    config.seed = 7  # another seed (and any resume) holds out the same images
    again, _ = split_of(config)
    np.testing.assert_array_equal(again["val"][0], vx)


def test_with_a_split_the_best_epoch_is_the_best_validation_epoch(mnist_dir, tmp_path, capsys):
    from mnist_jax import seeds

    config = dense_relu.get_config()
    config.data.dir, config.data.val_split, config.data.train_limit = str(mnist_dir), 2000, 4096
    config.epochs, config.plots, config.opt.lr = 4, False, 0.003
    (r,) = seeds.train(config, tmp_path)["runs"]
    rows = metrics.read(tmp_path / "metrics.jsonl")
    best = max(rows, key=lambda row: row["val_accuracy"])
    assert r["best_epoch"] == best["epoch"] and r["best_test_accuracy"] == best["test_accuracy"]
    assert all("val_loss" in row and "test_loss" in row for row in rows)
    out = capsys.readouterr().out
    assert f"val_acc {rows[-1]['val_accuracy']:.2%}" in out  # the epoch line names both
    drawn = plots.draw_all(tmp_path)
    names = ["confusion", "curves", "font_digits", "learning_rate", "test_digits"]
    assert sorted(p.name for p in drawn) == sorted(p.name for p in (tmp_path / "plots").iterdir()) == [f"{n}.png" for n in names]  # fmt: skip
    for path in drawn:
        with Image.open(path) as png:
            assert png.format == "PNG" and min(png.size) >= 200, (path, png.size)
    curves = np.asarray(Image.open(tmp_path / "plots" / "curves.png").convert("RGB"), int)
    assert curves.shape == (420, 1500, 3)  # figsize 15 x 4.2 at 100 dpi
    # The curves draw validation (green, #2ca02c) beside test (orange, #ff7f0e): markers of both.
    for rgb in ((0x2C, 0xA0, 0x2C), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(curves - rgb).max(-1) < 8).sum() > 50, rgb


def test_metrics_files_from_before_the_split_are_read_as_test_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 10, "val_accuracy": 0.9, "val_loss": 0.3}\n')  # fmt: skip
    (row,) = metrics.read(tmp_path / "metrics.jsonl")
    assert row == {"epoch": 1, "step": 10, "test_accuracy": 0.9, "test_loss": 0.3}
