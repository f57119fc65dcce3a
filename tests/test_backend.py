"""startup.resolve: the settings left to the backend, decided for the CPU and, simulated on this
machine, for a GPU; the suite's other tests state these choices as a function of the backend."""

import importlib
import os

import pytest
from jax._src import xla_bridge

from mnist_jax import config as config_lib
from mnist_jax import startup
from mnist_jax.config import XLA_CPU, ConfigError


def resolved(stage: str, seeds: int = 1, seed_mode: str = "auto", **settings):
    config = importlib.import_module(f"experiments.{stage}").get_config()
    config.update(seeds=seeds, seed_mode=seed_mode, **settings)
    return startup.resolve(config)


@pytest.fixture(params=["cpu", "gpu", "tpu"])
def backend(request, monkeypatch):
    """resolve as on this backend: jax.default_backend as startup sees it (the CPU's is real)."""
    monkeypatch.setattr(startup.jax, "default_backend", lambda: request.param)
    return request.param


def test_the_backends_choices(backend):
    cpu = backend == "cpu"
    for stage in ("dense_relu", "conv_bn"):
        config = resolved(stage, seeds=3)
        # The CPU runs a convolution inside a loop body several times slower: a conv net's steps unrolled,
        # 8 a call; a dense one's were slower so, one a call.
        assert config.steps_per_call == ((startup.CPU_STEPS_PER_CALL if stage == "conv_bn" else 1) if cpu else 0)
        # The CPU makes a convolution vmapped over per-seed weights a grouped one: in turn.
        assert config.seed_mode == ("turn" if cpu and stage == "conv_bn" else "vmap"), stage
        assert config.conv_grad == ("shifts" if cpu else "xla")
        assert config.xla_cpu == startup.xla_cpu_in_effect()  # recorded: what this process runs
        assert resolved(stage, seeds=1).seed_mode == "turn"  # one seed: nothing to vmap


def test_the_cpus_unrolled_calls_only_where_the_run_repays_compiling_them(backend):
    config = importlib.import_module("experiments.conv_bn").get_config()
    runtime, repaid = startup.resolve(config), startup.UNROLL_REPAID
    fit = lambda steps, c=config: startup.fit_to_run(runtime, c, steps).steps_per_call  # noqa: E731
    assert (fit(repaid - 1), fit(repaid)) == ((1, startup.CPU_STEPS_PER_CALL) if backend == "cpu" else (0, 0))
    config.steps_per_call = 5  # typed: kept, however short the run
    runtime = startup.resolve(config)
    assert fit(1) == fit(repaid) == 5


def test_a_choice_made_is_kept_and_the_config_stays_as_typed(backend, monkeypatch):
    config = resolved("conv", seeds=3, seed_mode="vmap", steps_per_call=7, conv_grad="xla")
    assert (config.seed_mode, config.steps_per_call, config.conv_grad) == ("vmap", 7, "xla")
    assert resolved("conv", seeds=3, seed_mode="turn").seed_mode == "turn"
    config = importlib.import_module("experiments.dense_relu").get_config()
    typed = config.to_dict()
    assert startup.resolve(config, 3).seed_mode == "vmap" and config.to_dict() == typed
    # Several processes: each trains its share of the batch, the seeds one after another.
    monkeypatch.setattr(startup.jax, "process_count", lambda: 2)
    assert resolved("dense_relu", seeds=3).seed_mode == "turn"


def test_the_cpus_kernels_are_set_before_jax_starts_and_what_ran_is_recorded(monkeypatch):
    ynn, other = XLA_CPU["ynn-no-conv"], "--xla_force_host_platform_device_count=2"

    def setting(xla_cpu: str, flags: str, started: bool = False):
        monkeypatch.setenv("XLA_FLAGS", flags)
        monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: started)
        config = config_lib.base()
        config.xla_cpu = xla_cpu
        startup.set_xla_cpu(config)
        return os.environ["XLA_FLAGS"], startup.xla_cpu_in_effect()

    assert setting("auto", other) == (f"{other} {ynn}", "ynn-no-conv")  # the CPU's faster kernels
    assert setting("auto", "", started=True) == ("", "default")  # too late to choose: what it has
    choosing = "--xla_cpu_experimental_ynn_fusion_type=invalid"
    assert setting("auto", choosing) == (choosing, "custom")  # XLA_FLAGS that choose win
    assert setting("default", f"{ynn} {other}") == (other, "default")  # XLA's own, the old setting
    assert setting("ynn-no-conv", "", started=False) == (ynn, "ynn-no-conv")
    assert setting("ynn-no-conv", ynn, started=True) == (ynn, "ynn-no-conv")  # has it already
    with pytest.raises(ConfigError, match=f"--xla-cpu default: JAX's backend has already started.*leave {ynn} out"):
        setting("default", ynn, started=True)
