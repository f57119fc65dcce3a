"""The process's set-up, once, and the choices that depend on the backend, in one place.

`start(config)` is what a command calls first: XLA's flags (read once, when JAX's backend
starts), JAX's persistent compilation cache and `jax.distributed`; these are the process's, so
the library's training function never sets them. `resolve` decides the settings whose best
value depends on the backend, here and nowhere else; the training function calls it, and
records what it chose beside the config (config_history.jsonl's runtime), not in it.
"""

import os

import jax
import ml_collections

from mnist_jax import parallel
from mnist_jax.config import XLA_CPU, ConfigError, flag_name, validate


def set_xla_cpu(config: ml_collections.ConfigDict) -> None:
    """Add config.xla_cpu's XLA_FLAGS (config.XLA_CPU). XLA reads them once, when JAX's backend
    starts, so this must run before anything touches a device."""
    wanted = XLA_CPU[config.xla_cpu].split()
    current = os.environ.get("XLA_FLAGS", "")
    if all(f in current.split() for f in wanted):
        return
    from jax._src import xla_bridge  # no public way to ask whether the backend has started

    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            f"{flag_name('xla_cpu')} {config.xla_cpu}: JAX's backend has already started in this "
            f"process; set XLA_FLAGS={' '.join(wanted)!r} before JAX starts instead"
        )
    os.environ["XLA_FLAGS"] = " ".join([current, *wanted]).strip()


def start(config: ml_collections.ConfigDict) -> None:
    """Set up this process for `config`: a command calls this once, first."""
    validate(config)  # a bad value: one line naming the flag, before anything starts
    set_xla_cpu(config)
    # $JAX_COMPILATION_CACHE_DIR, when set, wins: JAX reads it itself (the test suite sets one).
    if config.compile_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compile_cache))
    parallel.initialize(config.distributed)  # before resolve: the seed mode needs the count


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the settings left to the backend decided (idempotent; no side
    effects, so the library's train function calls it too):

    steps_per_call 0  1 on the CPU (XLA:CPU runs a convolution inside a loop body several times
                      slower, jax-ml/jax#12868), else 0: the whole epoch in one call;
    seed_mode auto    vmap on GPU/TPU; on the CPU vmap for the dense stages and turn for the
                      convolutional ones (XLA:CPU makes a convolution vmapped over per-seed
                      weights a grouped one, 4-5x slower); turn for one seed or several processes;
    conv_grad auto    space_to_depth on the CPU (models.ConvNet: the stride-2 convolutions'
                      input gradient as a stride-1 convolution, 4x faster on XLA:CPU), else xla.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    cpu = jax.default_backend() == "cpu"
    if config.steps_per_call == 0 and cpu:
        config.steps_per_call = 1
    if config.seed_mode == "auto":
        alone = config.seeds == 1 or jax.process_count() > 1
        conv_on_cpu = cpu and config.model.name == "conv"
        config.seed_mode = "turn" if alone or conv_on_cpu else "vmap"
    if config.conv_grad == "auto":
        config.conv_grad = "space_to_depth" if cpu else "xla"
    return config
