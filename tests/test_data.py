import gzip

import jax
import numpy as np
import pytest

from mnist_jax import data


def test_real_files_load(mnist):
    assert mnist.train_images.shape == (60_000, 28, 28, 1)
    assert mnist.test_images.shape == (10_000, 28, 28, 1)
    assert mnist.train_images.dtype == np.uint8 and mnist.train_labels.dtype == np.int32
    for labels in (mnist.train_labels, mnist.test_labels):
        assert set(np.unique(labels)) == set(range(10))
    # The README of the data folder gives the mean intensity of the training images.
    assert abs(mnist.train_images.mean() / 255 - 0.1307) < 5e-4


def test_normalize_scales_by_256():
    x = np.array([0, 128, 255], np.uint8)
    np.testing.assert_allclose(data.normalize(x), [0, 0.5, 255 / 256])


def test_raw_and_gzip_files_give_the_same_arrays(mnist_dir, tmp_path):
    for name in data.FILES.values():
        (tmp_path / name).write_bytes(gzip.decompress((mnist_dir / f"{name}.gz").read_bytes()))
    raw, gz = data.load_idx(tmp_path), data.load_idx(mnist_dir)
    for a, b in zip(raw[:4], gz[:4]):  # the arrays; their sources differ
        np.testing.assert_array_equal(a, b)


def test_load_uses_env_var(mnist_dir, monkeypatch):
    monkeypatch.setenv("MNIST_DATA_DIR", str(mnist_dir))
    assert data.load().test_labels.shape == (10_000,)


def _write_idx(path, magic, shape, payload: bytes, compress=True):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    raw = header + payload
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


@pytest.fixture
def small_dir(tmp_path):
    """A valid tiny IDX dataset: 20 train and 10 test examples."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(
            tmp_path / f"{split}-images-idx3-ubyte",
            2051,
            (n, 28, 28),
            rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes(),
        )
        _write_idx(
            tmp_path / f"{split}-labels-idx1-ubyte",
            2049,
            (n,),
            (np.arange(n) % 10).astype(np.uint8).tobytes(),
        )
    return tmp_path


def test_any_idx_dataset_loads(small_dir):
    ds = data.load_idx(small_dir)
    assert ds.train_images.shape == (20, 28, 28, 1) and ds.test_labels.shape == (10,)


def _corrupt(small_dir, how):
    images = small_dir / "train-images-idx3-ubyte.gz"
    labels = small_dir / "train-labels-idx1-ubyte.gz"
    if how == "bad magic":
        _write_idx(images.with_suffix(""), 0x01000803, (20, 28, 28), bytes(20 * 784))
        return images, "not an IDX file (bad magic number 16779267)"
    if how == "labels as images":
        _write_idx(images.with_suffix(""), 2049, (20 * 784,), bytes(20 * 784))
        return images, "1 dimensions, expected 3 or 4"
    if how == "type code not handled":
        _write_idx(images.with_suffix(""), 0x0D03, (20, 28, 28), bytes(20 * 784 * 4))
        return images, "IDX type code 0x0D (float) is not handled; only 0x08, unsigned bytes"
    if how == "truncated payload":
        _write_idx(images.with_suffix(""), 2051, (20, 28, 28), bytes(19 * 784))
        return images, "truncated"
    if how == "truncated gzip":
        images.write_bytes(images.read_bytes()[:200])
        return images, "not a valid gzip file"
    if how == "count mismatch":
        _write_idx(labels.with_suffix(""), 2049, (19,), bytes(19))
        return labels, "19 labels but train-images-idx3-ubyte.gz has 20 images"
    if how == "label out of range":  # of the classes stated (--data-num-classes 10)
        _write_idx(labels.with_suffix(""), 2049, (20,), bytes([3] * 19 + [10]))
        return labels, "label 10 at index 19 is not in 0..9 (--data-num-classes 10)"
    if how == "mixed shapes":
        test_images = small_dir / "t10k-images-idx3-ubyte.gz"
        _write_idx(test_images.with_suffix(""), 2051, (10, 32, 32), bytes(10 * 1024))
        return test_images, "images are 32x32x1, the training images 28x28x1"
    if how == "empty file":
        images.write_bytes(b"")
        return images, "file is empty"
    if how == "directory in place of file":
        images.unlink()
        images.mkdir()
        return images, "is a directory"
    if how == "missing file":
        labels.unlink()
        return small_dir / "train-labels-idx1-ubyte", "file not found"
    raise AssertionError(how)


CORRUPTIONS = [
    "bad magic",
    "labels as images",
    "type code not handled",
    "truncated payload",
    "truncated gzip",
    "count mismatch",
    "label out of range",
    "mixed shapes",
    "empty file",
    "directory in place of file",
    "missing file",
]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_broken_files_are_one_line_naming_the_file_and_end_a_run_with_exit_2(small_dir, how, tmp_path, capsys):  # fmt: skip
    """Both paths to the files: the loader's DataError, and a stage command, which prints that
    one line, exits 2 and writes nothing."""
    from experiments import linear
    from mnist_jax import cli

    path, problem = _corrupt(small_dir, how)
    with pytest.raises(data.DataError) as e:
        data.load_idx(small_dir, num_classes=10)
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message and problem in message

    args = ["--data-dir", str(small_dir), "--workdir", str(tmp_path / "run"), "--batch-size", "4",
            "--data-num-classes", "10"]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(linear.get_config, args)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"  # the loader's line, nothing more
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_missing_directory(tmp_path):
    with pytest.raises(data.DataError, match="directory not found"):
        data.load_idx(tmp_path / "nope")


def test_tfds_path_gives_the_same_layout():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=30):
        ds = data.load_tfds()
    assert ds.train_images.shape == (30, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_labels.shape == (30,) and ds.test_labels.dtype == np.int32
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() <= 9


def test_epoch_batches_are_a_seeded_permutation():
    rng = jax.random.PRNGKey(0)
    a = np.asarray(data.epoch_batches(rng, 0, 1000, 64))
    assert a.shape == (15, 64)  # remainder dropped, as the codelab's 60000 // BATCH_SIZE
    assert len(np.unique(a)) == a.size and a.max() < 1000
    np.testing.assert_array_equal(a, data.epoch_batches(rng, 0, 1000, 64))
    assert not np.array_equal(a, data.epoch_batches(rng, 1, 1000, 64))


def test_tfds_failure_is_one_line_pointing_at_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DataError) as e:
        data.load_tfds("no_such_dataset_here")
    message = str(e.value)
    assert "\n" not in message and message.startswith("TFDS could not load 'no_such_dataset_here'")
    assert "--data-dir" in message and "MNIST_DATA_DIR" in message
