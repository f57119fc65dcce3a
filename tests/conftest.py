"""Shared fixtures. Real-data tests need the IDX files: $MNIST_DATA_DIR, or ../shared/data/mnist."""

import atexit
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Keras picks its backend when first imported, and TensorFlow (installed for TFDS) would be the
# default: the Keras reference tests compare against Keras on JAX.
os.environ.setdefault("KERAS_BACKEND", "jax")

# One persistent compilation cache for this suite run: the test process and every command it
# starts (they inherit the environment) compile each program once. A fresh directory each run, so
# the suite's time never depends on what an earlier run left; set JAX_COMPILATION_CACHE_DIR to
# keep one across runs. Any compile time counts (JAX's default caches only programs over 1 s).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mnist_jax_test_jit_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# On a GPU the tests that compare runs need deterministic reductions (scatter-adds, cuDNN's
# algorithms); XLA reads XLA_FLAGS once, when the backend starts, which is lazily, after this.
# Not for a CPU-only run: XLA:CPU is deterministic, and the flag is a GPU one.
if os.environ.get("JAX_PLATFORMS", "") != "cpu":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_gpu_deterministic_ops=true".strip()
    # Two pytest workers (pyproject's addopts) share the GPU: neither takes 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from mnist_jax import config as config_lib
from mnist_jax import data, startup
from tests.helpers import postgres as postgres_helper

# The kernels a command picks on its own (config.xla_cpu auto), in XLA_FLAGS before JAX's backend starts: a
# command run in this process trains as one it starts does, whichever test started JAX first.
startup.set_xla_cpu(config_lib.base())

ROOT = Path(__file__).resolve().parents[1]


def assert_same_or_close(a, b, atol: float, rtol: float = 0.0) -> None:
    """Trees a and b from two differently compiled programs (K steps per call against single
    steps, vmapped against alone) that compute the same numbers: bitwise on the CPU, where it is
    measured true, within the stated bound elsewhere (a GPU's kernels may sum in another order)."""
    import jax
    import numpy as np

    if jax.default_backend() == "cpu":
        jax.tree.map(np.testing.assert_array_equal, a, b)
    else:
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def assert_runs_alike(a: Path, b: Path, bitwise: bool = True) -> None:
    """Two work directories that train the same steps in differently compiled programs (vmapped
    seeds, K steps a call): the same variables and logged rows ("seconds" aside), bitwise on the
    CPU where it is measured true (bitwise=True). Otherwise rounding may differ (a GPU's kernels;
    on the CPU, K unrolled steps against single ones), and Adam turns a last-bit change of a
    near-zero gradient into a step: the runs drift, within the CPU's own drift (RUN_DRIFT)."""
    import jax
    import numpy as np

    import mnist_jax
    from mnist_jax import metrics

    exact = bitwise and jax.default_backend() == "cpu"
    va, vb = mnist_jax.restore(a).variables, mnist_jax.restore(b).variables
    for name in ("metrics.jsonl", "train_steps.jsonl"):
        ra, rb = ([{k: v for k, v in r.items() if k != "seconds"} for r in metrics.read(d / name)] for d in (a, b))
        if exact:
            assert ra == rb, name
            continue
        assert [sorted(r) for r in ra] == [sorted(r) for r in rb], name
        for x, y in zip(ra, rb):
            for k in x:  # the step and epoch exactly, the numbers within the drift
                assert np.isclose(x[k], y[k], **RUN_DRIFT["rows"]) if isinstance(x[k], float) else x[k] == y[k], (name, x, y)  # fmt: skip
    if exact:
        jax.tree.map(np.testing.assert_array_equal, va, vb)
        return
    for u, v in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
        assert np.linalg.norm(u - v) <= RUN_DRIFT["weights"] * np.linalg.norm(v)


# Measured on the CPU, 5 vmapped seeds against the same in turn, 40 steps on 2,560 images
# (dense_relu, dense_dropout): each weight tensor 8e-7 of its norm apart at most, step losses
# 3.6e-7, test losses 1.2e-7, test accuracies equal. But a draw can drift: dense_dropout's seed
# 2 on 1,280 images, 7e-5 apart at step 7, 1e-2 by step 18. Room for that drift, not more.
RUN_DRIFT = {"rows": dict(rtol=0.05, atol=0.02), "weights": 0.05}


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


CONV_BN_TRAIN = 25_600  # trained_conv_bn's images: 400 steps of 64


@pytest.fixture(scope="session")
def trained_conv_bn(mnist_dir, tmp_path_factory):
    """conv_bn trained one epoch on the first 25,600 real training images (400 steps; the full
    epoch's 937 took 45 s): (workdir, final state).

    At lr 0.01 the run ends at a noisy point: the batch-norm averages (momentum 0.99) trail
    weights that still move fast, so what it reaches depends on the draw. Measured with this
    recipe, `python -m experiments.seeds conv_bn --epochs 1 --train-limit 25600 --seeds 6` on a
    2-core machine, seeds 0-5: test accuracy 92.48-97.11% (seed 0: 94.00%), of the first 20 test
    digits 19-20 right, of the 10 rendered font digits 9-10. (The full epoch: 96.21-98.83%, 18-20
    and 9-10; 200 steps: 40-91%, the averages not yet there.) Tests that use this model set
    their bars below that spread and say by how much.
    """
    from experiments import conv_bn
    from mnist_jax import loop

    config = conv_bn.get_config()
    config.data.dir = str(mnist_dir)
    config.data.train_limit = CONV_BN_TRAIN
    config.epochs = 1  # the default seed, 0: no test may train a seed picked because it passes
    # Trained once for all pytest workers (their base directories share a parent): the first
    # trains; the others, once it is done, find the run finished and restore it.
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    workdir = shared / "trained_conv_bn"
    with open(shared / "trained_conv_bn.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        return workdir, loop.train_and_evaluate(config, workdir)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server (tests/helpers/postgres.py); `postgres.database(name)` is a
    new database's URL. Where none can start, the test fails saying why: CI always has one."""
    try:
        with postgres_helper.server() as server:
            yield server
    except postgres_helper.Unavailable as e:
        pytest.fail(str(e))
