"""MNIST as four arrays in memory, from IDX files or from TFDS.

Images are uint8 [N, 28, 28, 1] and labels int32 [N]. They go to the device as they are;
`normalize` scales pixels by 1/256 inside the jitted step, as the codelab does
(`tf.cast(image, tf.float32) / 256.0`), so the dataset costs 1 byte per pixel on the device.
"""

import gzip
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
NUM_CLASSES = 10
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataError(Exception):
    """Unusable input data. The message is one line naming the file and the problem."""


class Dataset(NamedTuple):
    train_images: np.ndarray  # uint8 [N, 28, 28, 1]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray
    test_labels: np.ndarray


def normalize(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 pixels -> float32 in [0, 1), the codelab's scaling."""
    return images.astype(jnp.float32) / 256.0


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an IDX file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not raw:
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    return raw


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read one IDX file (raw or .gz), checking magic number, header and length."""
    path = Path(path)
    raw = _read_bytes(path)
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, expected {header})")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: bad magic number {found}, expected {magic}")
    shape = tuple(int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1))
    if ndim == 3 and shape[1:] != (28, 28):
        raise DataError(f"{path}: images are {shape[1]}x{shape[2]}, expected 28x28")
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "too long"
        raise DataError(
            f"{path}: {what}: {len(raw)} bytes, header says {shape[0]} items ({expected} bytes)"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.exists():
            return candidate
    raise DataError(f"{data_dir / name}[.gz]: file not found")


# The last IDX dataset read, by its files' (path, size, mtime): a process that trains several
# runs (seeds in turn, the tests) reads the same files once; a changed file is read again.
_last: dict = {}


def load_idx(data_dir: str | os.PathLike) -> Dataset:
    """The four official IDX files from a directory (gzip-compressed or raw)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "directory not found"
        raise DataError(f"{data_dir}: {what}")
    paths = {key: _find(data_dir, name) for key, name in FILES.items()}
    stamp = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths.values())  # fmt: skip
    if stamp in _last:
        return _last[stamp]
    arrays = {}
    for split in ("train", "test"):
        img_path, lbl_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(img_path, IMAGE_MAGIC)
        labels = read_idx(lbl_path, LABEL_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"{lbl_path}: {len(labels)} labels but {img_path.name} has {len(images)} images"
            )
        if len(labels) and labels.max() >= NUM_CLASSES:
            bad = int(np.argmax(labels >= NUM_CLASSES))
            raise DataError(f"{lbl_path}: label {labels[bad]} at index {bad} is not in 0..9")
        if len(labels) == 0:
            raise DataError(f"{lbl_path}: holds no examples")
        arrays[f"{split}_images"] = images[..., None]
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    _last.clear()
    _last[stamp] = Dataset(**arrays)
    return _last[stamp]


def load_tfds(name: str = "mnist") -> Dataset:
    """MNIST from TensorFlow Datasets (downloads and prepares it once; needs TensorFlow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds

    def split(s):
        # Iterate in batches: batch_size=-1 needs a known cardinality, which mock data lacks.
        ds = tfds.load(name, split=s, as_supervised=True, batch_size=10_000)
        parts = list(tfds.as_numpy(ds))
        images = np.concatenate([p[0] for p in parts]).astype(np.uint8)
        labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
        return images.reshape(-1, 28, 28, 1), labels

    try:
        (tr_x, tr_y), (te_x, te_y) = split("train"), split("test")
    except Exception as e:  # download, preparation or import failures all end the same way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"TFDS could not load {name!r} ({type(e).__name__}: {reason}); without internet, "
            "pass --data-dir DIR (or set MNIST_DATA_DIR) to a directory with the four IDX files"
        ) from None
    return Dataset(tr_x, tr_y, te_x, te_y)


def load(data_dir: str | os.PathLike | None = None) -> Dataset:
    """IDX files from `data_dir`, else from $MNIST_DATA_DIR, else TFDS."""
    data_dir = data_dir or os.environ.get("MNIST_DATA_DIR")
    return load_idx(data_dir) if data_dir else load_tfds()


_hashed: dict = {}  # the last dataset hashed, and its hash


def identity(ds: Dataset, data_dir: str | os.PathLike | None = None) -> dict:
    """What the data are, for a run's config: a hash of the four arrays (0.06 s for MNIST), their
    sizes and shapes. A run resumes only on the same data, wherever its files sit."""
    data_dir = data_dir or os.environ.get("MNIST_DATA_DIR")
    source = f"idx {Path(data_dir).resolve()}" if data_dir else "tfds mnist"
    if _hashed.get("of") is not ds:  # the same arrays: hashed once
        digest = hashlib.sha256()
        for array in ds:
            digest.update(np.ascontiguousarray(array))
        _hashed.update(of=ds, sha256=digest.hexdigest())
    return {
        "source": source,
        "sha256": _hashed["sha256"],
        "num_train": len(ds.train_labels),
        "num_test": len(ds.test_labels),
        "image_shape": list(ds.train_images.shape[1:]),
        "num_classes": NUM_CLASSES,
    }


def epoch_batches(rng, epoch: int, num_examples: int, batch_size: int) -> jnp.ndarray:
    """Indices [steps, batch] of one epoch: a permutation drawn from (rng, epoch), remainder dropped.

    A function of (seed, epoch) only, so a resumed run sees the same order.
    """
    steps = num_examples // batch_size
    perm = jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)
