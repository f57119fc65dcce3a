"""startup.resolve: the settings left to the backend, decided for the CPU and, simulated on this
machine, for a GPU; the suite's other tests state these choices as a function of the backend."""

import importlib

import pytest

from mnist_jax import startup


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
        # The CPU runs a convolution inside a loop body several times slower: one step a call.
        assert config.steps_per_call == (1 if cpu else 0)
        # The CPU makes a convolution vmapped over per-seed weights a grouped one: in turn.
        assert config.seed_mode == ("turn" if cpu and stage == "conv_bn" else "vmap"), stage
        assert config.conv_grad == ("space_to_depth" if cpu else "xla")
        assert resolved(stage, seeds=1).seed_mode == "turn"  # one seed: nothing to vmap


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
