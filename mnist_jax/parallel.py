"""Data parallelism with jax.sharding: one 1-D mesh, batches split over it, the rest replicated.

The data and the state are replicated; inside the step the batch is constrained to P("data"),
so each device computes its slice and XLA inserts the all-reduces: gradients and batch-norm
statistics are the global batch's, whatever the device count (tests/test_parallel.py).
Processes (hosts) join through `jax.distributed.initialize()`; the mesh spans all their devices.
"""

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_jax.config import ConfigError

AXIS = "data"


def initialize(dist: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize() when asked: by flags, or --distributed-auto (SLURM, MPI...)."""
    if not (dist.auto or dist.coordinator) or jax.distributed.is_initialized():
        return  # once a process: --seeds in turn trains several runs in it
    if dist.coordinator and (dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes):
        raise ConfigError(
            "--distributed-coordinator needs --distributed-num-processes N and "
            f"--distributed-process-id in 0..N-1, got {dist.num_processes} and {dist.process_id}"
        )
    # .get: config.json of runs from before these fields
    timeouts = dict(
        initialization_timeout=dist.get("init_timeout", 300),
        heartbeat_timeout_seconds=dist.get("heartbeat_timeout", 100),
        shutdown_timeout_seconds=dist.get("shutdown_timeout", 300),
    )
    # Without a coordinator, the cluster (SLURM, Open MPI, Kubernetes) says who is who.
    who = (dist.coordinator, dist.num_processes, dist.process_id) if dist.coordinator else ()
    jax.distributed.initialize(*who, **timeouts)


def make_mesh(devices: int = 0) -> Mesh:
    """A 1-D mesh over the first `devices` devices (0: all, of every process)."""
    available = jax.devices()
    if devices:
        if jax.process_count() > 1 and devices != len(available):
            raise ConfigError(
                f"--devices: with {jax.process_count()} processes, use all {len(available)} devices (0), got {devices}"
            )
        if devices > len(available):
            raise ConfigError(
                f"--devices: {devices} asked, {len(available)} available "
                f"({available[0].platform}); on a CPU, XLA_FLAGS="
                f"--xla_force_host_platform_device_count={devices} makes more"
            )
        available = available[:devices]
    return Mesh(np.array(available), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the devices."""
    return NamedSharding(mesh, P(AXIS))


seed_sharding = batch_sharding  # vmapped runs: the leading (run) axis split over the devices


def put_replicated(tree, mesh: Mesh):
    """Host arrays -> global arrays with a full copy on every device of the mesh (arrays already
    so are kept). Works with several processes: each supplies the copies of its own devices."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Global arrays -> numpy, also when they span other processes' devices."""

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise ConfigError(
            f"--batch-size: {batch_size} does not split over {mesh.size} devices; use a multiple of {mesh.size}"
        )


def is_primary() -> bool:
    """Process 0 writes the files of a run (metrics, plots); every process checkpoints."""
    return jax.process_index() == 0


def reached_preemption(step: int) -> bool:
    """Whether every process stops at `step`: True on all at the same step once any received
    SIGTERM (JAX's preemption sync manager). Each gives it every step in order, as Orbax's save does."""
    return multihost_utils.reached_preemption_sync_point(step)


def agree(ok: bool) -> bool:
    """Whether `ok` holds on every process: the same answer on all (a collective all must enter)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
