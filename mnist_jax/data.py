"""An image-classification dataset as four arrays in memory, from IDX files or from TFDS.

Images uint8 [N, H, W, C] (1 byte a pixel on the device; `normalize` scales them in the jitted step),
labels int32 [N]. `identity` is what a run records of its data."""

import gzip
import hashlib
import logging
import math
import os
import socket
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int", 0x0D: "float", 0x0E: "double"}
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DIGITS_TFDS = ("mnist", "emnist/digits", "emnist/mnist")  # classes 0-9 written by hand
PROBE_SECONDS = 3.0  # for a TFDS host to connect: offline, TFDS itself retries for minutes
TFDS_GCS = "https://storage.googleapis.com/tfds-data"  # TFDS's copies (gs://tfds-data)
NO_NETWORK = "without internet, pass --data-dir DIR (or set MNIST_DATA_DIR), and no --data-tfds, to a directory with the four IDX files"


class DataError(Exception):
    """Unusable input data. The message is one line naming the file and the problem."""


class Dataset(NamedTuple):
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N], in 0..num_classes-1
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int = 10
    names: tuple = ()  # the classes' names, where the dataset has them
    source: str = ""  # "idx DIR" or "tfds NAME"


def normalize(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 pixels -> float32 in [0, 1), the codelab's scaling (/ 256)."""
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


def read_idx(path: str | os.PathLike, dims: tuple[int, ...]) -> np.ndarray:
    """One IDX file (raw or .gz) of unsigned bytes with one of `dims` dimensions, header and length checked."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] or raw[1]:
        raise DataError(f"{path}: not an IDX file (bad magic number {int.from_bytes(raw[:4], 'big')})")
    code, ndim = raw[2], raw[3]
    if code != 0x08:  # unsigned bytes, the one type read
        what = IDX_TYPES.get(code, "unknown")
        raise DataError(f"{path}: IDX type code 0x{code:02X} ({what}) is not handled; only 0x08, unsigned bytes")
    if ndim not in dims:
        raise DataError(f"{path}: {ndim} dimensions, expected {' or '.join(map(str, dims))}")
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, expected {header})")
    shape = tuple(int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1))
    expected = header + math.prod(shape)  # Python ints: np.prod wraps at 2**63
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "too long"
        raise DataError(f"{path}: {what}: {len(raw)} bytes, header says {shape[0]} items ({expected} bytes)")
    array = np.frombuffer(raw, np.uint8, offset=header).reshape(shape)
    return array[..., None] if ndim == 3 else array  # images: a channel axis


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.exists():
            return candidate
    raise DataError(f"{data_dir / name}[.gz]: file not found")


def _checked(arrays: dict, paths: dict, num_classes: int, source: str, names=()) -> Dataset:
    """A Dataset from {train,test}_{images,labels}, after the checks any source needs."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        images_file, where = paths[f"{split}_images"].name, paths[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{where}: {len(labels)} labels but {images_file} has {len(images)} images")
        if len(labels) == 0:
            raise DataError(f"{where}: holds no examples")
    train, test = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if 0 in train:  # a model would have no pixels to look at
        raise DataError(f"{paths['train_images']}: images are {'x'.join(map(str, train))}: no pixels")
    if train != test:
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        raise DataError(f"{paths['test_images']}: images are {shape(test)}, the training images {shape(train)}")
    num_classes = num_classes or int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        if labels.max() >= num_classes:
            bad = int(np.argmax(labels >= num_classes))
            raise DataError(
                f"{paths[f'{split}_labels']}: label {labels[bad]} at index {bad} is not in 0..{num_classes - 1} (--data-num-classes {num_classes})"
            )
    unseen = np.setdiff1d(arrays["test_labels"], arrays["train_labels"])
    if len(unseen):  # the model has outputs for them, but nothing ever trains them
        shown = ", ".join(map(str, unseen[:10])) + (", ..." if len(unseen) > 10 else "")
        print(f"warning: {paths['test_labels']}: test labels {shown} are in no training image", file=sys.stderr)
    labels = {k: v.astype(np.int32) for k, v in arrays.items() if k.endswith("labels")}
    return Dataset(**{**arrays, **labels}, num_classes=num_classes, names=tuple(names), source=source)


_last: dict = {}  # the last IDX dataset read, by its files' (path, size, mtime): read once a process


def load_idx(data_dir: str | os.PathLike, num_classes: int = 0) -> Dataset:
    """The four IDX files (gzipped or raw) from a directory; num_classes 0: from the labels."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "directory not found"
        raise DataError(f"{data_dir}: {what}")
    paths = {key: _find(data_dir, name) for key, name in FILES.items()}
    stamp = (num_classes, *((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths.values()))
    if stamp not in _last:
        arrays = {k: read_idx(p, (1,) if k.endswith("labels") else (3, 4)) for k, p in paths.items()}
        _last.clear()
        _last[stamp] = _checked(arrays, paths, num_classes, f"idx {data_dir.resolve()}")
    return _last[stamp]


def unreachable(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why `url`'s host (or proxy) takes no TCP connection in `timeout` s (in a thread); None if it does."""
    import requests

    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    proxy = f"http://{proxy}" if proxy and "//" not in proxy else proxy
    where = urllib.parse.urlsplit(proxy or url)
    host, port = where.hostname, where.port or (443 if where.scheme == "https" else 80)
    outcome = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or str(e) or type(e).__name__)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    reason = outcome[0] if outcome else f"no answer in {timeout:g}s"
    return reason and f"{host}:{port}{' (proxy)' if proxy else ''}: {reason}"


def _check_download(builder) -> None:
    """DataError when a host of `builder`'s download does not answer (TFDS: 3.5 minutes of retries)."""
    urls = sorted(builder.url_infos or ()) or [TFDS_GCS]  # the hosts of its files, else TFDS's
    for url in {urllib.parse.urlsplit(u).hostname: u for u in urls}.values():  # one URL a host
        if reason := unreachable(url):
            raise DataError(
                f"TFDS could not load {builder.name!r}: it is not prepared in {builder.data_dir} "
                f"and its download host is unreachable ({reason}); {NO_NETWORK}"
            )


def load_tfds(name: str = "mnist", num_classes: int = 0) -> Dataset:
    """A TFDS dataset by name (train, test, class names), downloaded only if its host answers."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds

    def split(s, download):
        # Iterate in batches: batch_size=-1 needs a known cardinality, which mock data lacks.
        ds, info = tfds.load(name, split=s, as_supervised=True, batch_size=10_000, with_info=True, download=download)
        parts = list(tfds.as_numpy(ds))
        images = np.concatenate([p[0] for p in parts]).astype(np.uint8)
        images = images[..., None] if images.ndim == 3 else images
        return images, np.concatenate([p[1] for p in parts]).astype(np.int32), info

    absl = logging.getLogger("absl")  # TFDS warns of each version folder it finds empty
    level = absl.level
    try:
        absl.setLevel(logging.ERROR)
        try:  # what is prepared here (or TFDS's mock data), without the network
            loaded = split("train", False), split("test", False)
        except Exception:
            builder = tfds.builder(name)
            if builder.is_prepared():
                raise
            _check_download(builder)
            absl.setLevel(level)  # a download's own warnings are the user's to see
            loaded = split("train", True), split("test", True)
        (tr_x, tr_y, info), (te_x, te_y, _) = loaded
        names = getattr(info.features[info.supervised_keys[1]], "names", None) or ()
    except DataError:
        raise
    except Exception as e:  # download, preparation or import failures all end the same way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"TFDS could not load {name!r} ({type(e).__name__}: {reason}); {NO_NETWORK}") from None
    finally:
        absl.setLevel(level)
    arrays = dict(train_images=tr_x, train_labels=tr_y, test_images=te_x, test_labels=te_y)
    paths = {k: Path(f"tfds {name} {k.split('_')[0]}") for k in arrays}
    return _checked(arrays, paths, num_classes or len(names), f"tfds {name}", names)


def load(data_dir: str | os.PathLike | None = None, tfds: str = "", num_classes: int = 0) -> Dataset:
    """TFDS's `tfds`; else IDX files from `data_dir` or $MNIST_DATA_DIR; else TFDS's MNIST."""
    data_dir = None if tfds else data_dir or os.environ.get("MNIST_DATA_DIR")
    return load_idx(data_dir, num_classes) if data_dir else load_tfds(tfds or "mnist", num_classes)


def from_config(data_config) -> Dataset:
    """`load` of a config's data section (data.dir, data.tfds, data.num_classes)."""
    return load(data_config.get("dir") or None, data_config.get("tfds", ""), data_config.get("num_classes", 0))


def digits(ds: Dataset, setting: str = "auto") -> bool:
    """Whether the classes are MNIST-like digits 0-9: yes, no, or auto (DIGITS_TFDS, or 28x28x1 in 10 classes)."""
    if setting != "auto":
        return setting == "yes"
    if ds.source.startswith("tfds "):
        return ds.source.split(" ", 1)[1] in DIGITS_TFDS
    return ds.train_images.shape[1:] == (28, 28, 1) and ds.num_classes == 10


def spec(config) -> tuple[tuple, int, int]:
    """(image shape, classes, training images) from config.dataset, else MNIST's (a stage's config)."""
    info = config.get("dataset") or {}
    num_train = info.get("num_train", 60_000) - config.data.get("val_split", 0)
    shape = tuple(info.get("image_shape", (28, 28, 1)))
    return shape, info.get("num_classes", 10), config.data.get("train_limit") or num_train


_hashed: dict = {}  # the last dataset hashed, and its hash


def identity(ds: Dataset, digits_setting: str = "auto") -> dict:
    """What the data are, for a run's config (a run resumes only on the same data): hash (0.06 s), shapes, classes."""
    if _hashed.get("of") is not ds:  # the same arrays: hashed once
        digest = hashlib.sha256()
        for array in ds[:4]:
            digest.update(np.ascontiguousarray(array))
        _hashed.update(of=ds, sha256=digest.hexdigest())
    return {
        "source": ds.source,
        "sha256": _hashed["sha256"],
        "num_train": len(ds.train_labels),
        "num_test": len(ds.test_labels),
        "image_shape": list(ds.train_images.shape[1:]),
        "num_classes": ds.num_classes,
        "names": list(ds.names),
        "digits": digits(ds, digits_setting),
    }


def epoch_batches(rng, epoch: int, num_examples: int, batch_size: int) -> jnp.ndarray:
    """Indices [steps, batch] of one epoch: a permutation from (rng, epoch) only, remainder dropped."""
    steps = num_examples // batch_size
    perm = jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)
