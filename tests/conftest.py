"""Shared fixtures. Real-data tests need the IDX files: $MNIST_DATA_DIR, or ../shared/data/mnist."""

import os
from pathlib import Path

import pytest

from mnist_jax import data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    candidates = [os.environ.get("MNIST_DATA_DIR"), ROOT.parent / "shared" / "data" / "mnist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "t10k-labels-idx1-ubyte.gz").exists():
            return Path(candidate).resolve()
    # Real-data tests must not pass by skipping: say what is missing instead.
    pytest.fail("MNIST IDX files not found: set MNIST_DATA_DIR to a directory holding them")


@pytest.fixture(scope="session")
def mnist(mnist_dir) -> data.Dataset:
    return data.load_idx(mnist_dir)
