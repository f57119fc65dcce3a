"""Never lose a run: a changed recipe is refused before anything is written, allowed changes are
recorded, damaged checkpoints are moved aside, and a new run can start from an old one's weights."""

import hashlib
import importlib
import json
import logging
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import optax
import pytest

import mnist_jax
from experiments import conv, conv_bn, dense_relu, linear
from mnist_jax import (
    cli,
    data,
    evaluate,
    flags,
    loop,
    metrics,
    models,
    optim,
    plots,
    predict,
    recipe,
    startup,
    train,
)
from mnist_jax import config as config_lib
from mnist_jax.config import ConfigError
from tests.conftest import ROOT
from tests.test_models import PARAMS

STAGES = [*PARAMS, "speedrun"]


def stage_config(name):
    return importlib.import_module(f"experiments.{name}").get_config()


def snapshot(directory):
    """Every file under `directory` and a hash of its bytes, and every directory."""
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"  # noqa: E731
    return {str(p.relative_to(directory)): digest(p) for p in sorted(directory.rglob("*"))}


def exits(capsys, get_config, argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a stage command run in this process."""
    capsys.readouterr()
    try:
        cli.run(get_config, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def small(mnist_dir, workdir, *extra):
    """A quick run: 10 steps of 128 an epoch, 500 test images."""
    return ["--data-train-limit", "1280", "--data-test-limit", "500", "--plots", "false",
            "--data-dir", str(mnist_dir), "--workdir", str(workdir), *extra]  # fmt: skip


# Every config leaf has a class, in one place -------------------------------------------------


def all_leaves() -> set[str]:
    recorded = "source sha256 num_train num_test image_shape num_classes names digits".split()
    paths = {f"dataset.{k}" for k in recorded}  # data.identity's, recorded at a run's start
    for name in STAGES:
        paths |= {p for p, _ in flags.leaves(stage_config(name))}
    for name in models.MODELS:  # every model's fields, whichever stage uses them
        paths |= {f"model.{k}" for k in models.fields(name)}
    return paths


def test_every_config_leaf_has_a_class_and_every_class_a_leaf():
    leaves = all_leaves()
    missing = sorted(leaves - config_lib.FIELD_CLASSES.keys())
    assert not missing, f"give these fields a class in config.FIELD_CLASSES: {missing}"
    assert not sorted(config_lib.FIELD_CLASSES.keys() - leaves), "classes of fields that are gone"


def other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, (tuple, list)):
        return (*value, 7)
    return value + "_other"


@pytest.mark.parametrize("schedule", ["exponential", "onecycle"])
def test_each_field_is_refused_or_recorded_by_its_class(schedule):
    """Change each leaf alone: recipe fields are refused with a line naming the flag and both
    values, the others are allowed and recorded; epochs is recipe only under onecycle."""
    base = conv_bn.get_config()
    base.opt.schedule = schedule
    base.dataset = {"source": "idx x", "sha256": "a" * 64, "num_train": 60000, "num_test": 10000,
                    "image_shape": [28, 28, 1], "num_classes": 10}  # fmt: skip
    old = json.loads(base.to_json())
    for path, value in flags.leaves(base):
        new = json.loads(base.to_json())
        *parents, key = path.split(".")
        node = new
        for part in parents:
            node = node[part]
        node[key] = other_value(value)
        refused, changed = recipe.compare(old, ml_collections.ConfigDict(new))
        kind = config_lib.FIELD_CLASSES[path]
        if kind == config_lib.RECIPE or (kind == config_lib.LENGTH and schedule == "onecycle"):
            assert len(refused) == 1 and not changed, path
            if not path.startswith("dataset."):
                assert refused[0].lstrip().startswith(config_lib.flag_name(path) + ": "), refused
        else:
            assert not refused and list(changed) == [path], path


def test_a_field_missing_from_an_older_config_counts_as_its_default():
    now = conv_bn.get_config()
    old = json.loads(now.to_json())
    del old["init_from"], old["model"]["dropout"]  # fields an older run did not write
    old["model"]["dropout"] = 0.0  # conv_bn's 0.3 is not the model's default: a real change
    refused, _ = recipe.compare(old, now)
    assert refused == ["  --model-dropout: 0.0 in that run, 0.3 here"]
    del old["model"]["dropout"]
    now.model.dropout = 0.0  # the model's default: what the older code trained
    assert recipe.compare(old, now) == ([], {})


# Real runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_run(mnist_dir, tmp_path_factory):
    """The issue's first command: linear, 2 epochs, SGD."""
    workdir = tmp_path_factory.mktemp("linear")
    cli.run(linear.get_config, small(mnist_dir, workdir, "--epochs", "2"))
    return workdir


def test_a_changed_recipe_is_refused_and_nothing_is_written(linear_run, mnist_dir, capsys, caplog):
    before = snapshot(linear_run)
    assert {"checkpoints/10", "checkpoints/20"} <= before.keys()
    code, out, err = exits(capsys, linear.get_config, small(mnist_dir, linear_run, "--epochs", "3", "--opt-name", "adam"))  # fmt: skip
    assert code == 2, err
    assert err.splitlines() == [
        f"error: --workdir {linear_run}: holds a run of another recipe, left as it is:",
        "  --opt-name: sgd in that run, adam here",
        f"To keep it, use another --workdir (add --init-from {linear_run} to start from its "
        "weights); to discard it, add --restart.",
    ]
    assert snapshot(linear_run) == before  # every file, byte for byte


def test_init_from_starts_a_new_recipe_from_the_old_weights(linear_run, mnist_dir, tmp_path, capsys):
    """The initial state, evaluated before the first step, is the source's last evaluation."""
    args = small(mnist_dir, tmp_path, "--epochs", "3", "--opt-name", "adam", "--init-from", str(linear_run))  # fmt: skip
    config = flags.parse_config(linear.get_config(), args)
    run = loop.setup(config, [tmp_path], startup.resolve(config))
    source = metrics.read(linear_run / "metrics.jsonl")[-1]
    (ev,) = run.evaluate("test")
    assert float(ev["accuracy"]) == source["test_accuracy"]
    adam = run.state.opt_state.inner_state[0]  # a new optimizer: Adam's first step is to come
    assert run.step == 0 and int(adam.count) == 0
    assert all(not np.any(x) for x in jax.tree.leaves((adam.mu, adam.nu)))
    history = metrics.read(tmp_path / recipe.HISTORY)
    assert history[0]["init_from"] == {"dir": str(linear_run.resolve()), "step": 20}
    assert json.loads((tmp_path / "config.json").read_text())["init_from"] == str(linear_run)
    # The command trains from there.
    code, out, err = exits(capsys, linear.get_config, small(mnist_dir, tmp_path, "--epochs", "3",
                           "--opt-name", "adam", "--init-from", str(linear_run)))  # fmt: skip
    assert code == 0, err
    assert [r["epoch"] for r in metrics.read(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_init_from_with_seeds_takes_each_seed_from_its_own(mnist_dir, tmp_path, capsys):
    """--seeds 2 from a --seeds 2 run: seed s from seed_<s>/; from a single run: every seed from
    it; from a run without the seed asked for: one line."""
    source = tmp_path / "source"
    assert exits(capsys, linear.get_config, small(mnist_dir, source, "--epochs", "1", "--seeds", "2"))[0] == 0  # fmt: skip

    def starts(start, origins):
        new = tmp_path / f"from_{start.name}"
        config = flags.parse_config(linear.get_config(), small(mnist_dir, new, "--seeds", "2", "--init-from", str(start)))  # fmt: skip
        run = loop.setup(config, [new / "seed_0", new / "seed_1"], startup.resolve(config))
        for i, origin in enumerate(origins):
            expected = mnist_jax.restore(origin).variables["params"]
            jax.tree.map(np.testing.assert_array_equal, run.runs[i].state.params, expected)  # fmt: skip

    starts(source, [source / "seed_0", source / "seed_1"])
    starts(source / "seed_1", [source / "seed_1", source / "seed_1"])
    code, _, err = exits(capsys, linear.get_config, small(mnist_dir, tmp_path / "w", "--seeds", "2", "--seed", "1", "--init-from", str(source)))  # fmt: skip
    assert code == 2
    assert err.splitlines() == [f"error: --init-from {source}: holds seed_0, seed_1, no seed_2/ for seed 2"]  # fmt: skip


def test_init_from_a_model_that_does_not_fit_is_one_line(linear_run, mnist_dir, tmp_path, capsys):
    code, _, err = exits(capsys, dense_relu.get_config, small(mnist_dir, tmp_path / "w", "--init-from", str(linear_run)))  # fmt: skip
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"error: --init-from: {linear_run / 'checkpoints' / '20'}: does not fit")
    assert "(model.params.Dense_0.bias is (200,) float32 here, (10,) float32 in the checkpoint)" in line  # fmt: skip
    assert not (tmp_path / "w").exists()


def test_allowed_changes_are_recorded_and_arithmetic_ones_said(linear_run, mnist_dir, tmp_path, capsys):
    import shutil

    shutil.copytree(linear_run, tmp_path, dirs_exist_ok=True)
    k = metrics.read(linear_run / recipe.HISTORY)[-1]["runtime"]["steps_per_call"]  # the backend's
    code, out, err = exits(capsys, linear.get_config, small(mnist_dir, tmp_path, "--epochs", "3", "--steps-per-call", "2", "--log-every", "5"))  # fmt: skip
    assert code == 0, err
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert note == [
        f"note: --steps-per-call {k} -> 2 since this run's last start: the same recipe computed in "
        "another order, so from step 20 it is no longer bit for bit the uninterrupted run "
        f"(recorded in {tmp_path / recipe.HISTORY})"
    ]
    last = metrics.read(tmp_path / recipe.HISTORY)[-1]
    assert last["step"] == 20
    assert last["changed"] == {"epochs": [2, 3], "log_every": [50, 5], "steps_per_call": [0, 2],
                               "runtime.steps_per_call": [k, 2],  # 0: per backend, 8 on the CPU
                               "workdir": [str(linear_run), str(tmp_path)]}  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["steps_per_call"] == 2
    assert [r["epoch"] for r in metrics.read(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_an_older_config_without_the_newer_fields_resumes(linear_run, mnist_dir, tmp_path, capsys):
    import shutil

    shutil.copytree(linear_run, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    del old["init_from"], old["dataset"]  # written by this code, not by the runs before it
    path.write_text(json.dumps(old))
    (tmp_path / recipe.HISTORY).unlink()
    code, out, err = exits(capsys, linear.get_config, small(mnist_dir, tmp_path, "--epochs", "3"))
    assert code == 0, err
    assert "Resumed" in out and "note:" not in out
    changed = metrics.read(tmp_path / recipe.HISTORY)[-1]["changed"]
    assert changed["dataset.sha256"][0] is None and changed["epochs"] == [2, 3]


def test_a_schedule_that_spans_the_run_refuses_more_epochs(mnist_dir, tmp_path, capsys):
    args = small(mnist_dir, tmp_path, "--opt-schedule", "onecycle")
    assert exits(capsys, linear.get_config, [*args, "--epochs", "1"])[0] == 0
    before = snapshot(tmp_path)
    code, _, err = exits(capsys, linear.get_config, [*args, "--epochs", "2"])
    assert code == 2
    assert "  --epochs: 1 in that run, 2 here (--opt-schedule onecycle spans the whole run)" in err
    assert snapshot(tmp_path) == before


def test_an_intact_checkpoint_that_the_code_no_longer_fits_is_kept(linear_run, mnist_dir, tmp_path, capsys, monkeypatch):  # fmt: skip
    """A research fork changes the optimizer in code (config.json unchanged): refused, kept."""
    import shutil

    shutil.copytree(linear_run, tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path)
    original = optim.optimizer
    monkeypatch.setattr(optim, "optimizer", lambda *a: optax.chain(optax.scale_by_adam(), original(*a)))  # fmt: skip
    code, _, err = exits(capsys, linear.get_config, small(mnist_dir, tmp_path, "--epochs", "2"))
    assert code == 2
    (line,) = err.splitlines()
    assert f"checkpoint {tmp_path / 'checkpoints' / '20'} does not fit what this code builds (train.opt_state" in line  # fmt: skip
    assert "it is kept as it is" in line
    assert snapshot(tmp_path) == before


def test_commands_that_read_a_run_refuse_one_that_does_not_fit(linear_run, tmp_path, capsys):
    """evaluate, predict and plots on a run whose config.json is another stage's, or names a
    model field this code does not have: one line, exit 2, nothing written."""
    import shutil

    from tests.test_cli import exits as exits_main

    for case in ("another stage", "an older model layout"):
        workdir = tmp_path / case.replace(" ", "_")
        shutil.copytree(linear_run, workdir)
        config = json.loads((workdir / "config.json").read_text())
        if case == "another stage":
            config["model"] = json.loads(conv.get_config().model.to_json())
        else:
            config["model"]["bias"] = True
        (workdir / "config.json").write_text(json.dumps(config))
        before = snapshot(workdir)
        png = ROOT / "docs" / "none.png"  # never read: the run is refused first
        for main, argv in ((evaluate.main, []), (plots.main, []), (predict.main, [str(png)])):
            code, _, err = exits_main(capsys, main, ["--workdir", str(workdir), *argv])
            assert code == 2, (case, main)
            (line,) = err.splitlines()
            if case == "another stage":
                assert "does not fit the model this code builds (model.params.Conv_0 is present here, absent in the checkpoint)" in line  # fmt: skip
            else:
                assert "config.json: this code cannot build its model (--model-name softmax: the softmax model has no --model-bias" in line  # fmt: skip
        assert snapshot(workdir) == before


def test_no_developer_warnings_from_the_read_only_restore(linear_run, caplog):
    with caplog.at_level(logging.WARNING):
        plots.draw_all(linear_run)
    assert not [r for r in caplog.records if "read_only" in r.getMessage() or "read only" in r.getMessage()]  # fmt: skip


# Every flag combination a stage cannot train is one line --------------------------------------


def build(config):
    """What a stage command does before it loads data: validate, build the model's shapes."""
    config_lib.validate(config)
    models.build(**config.model)
    return jax.eval_shape(lambda: train.create_train_state(config, jax.random.PRNGKey(0), 10))


@pytest.mark.parametrize("name", STAGES)
def test_every_model_name_on_every_stage_trains_or_is_one_line(name):
    for model in models.MODELS:
        config = flags.parse_config(stage_config(name), ["--model-name", model])
        foreign = set(config.model) - {"name"} - set(models.fields(model))
        if foreign:
            with pytest.raises(ConfigError) as e:
                build(config)
            message = str(e.value)
            assert "\n" not in message and message.startswith(f"--model-name {model}: the {model} model has no ")  # fmt: skip
            assert all(config_lib.flag_name(f"model.{k}") in message for k in foreign)
        else:
            state = build(config)  # e.g. linear --model-name conv: the model's own defaults
            # It trains: a whole training step (forward, gradients, the optimizer's update) is
            # traced on a batch of the data's shape, and updates every parameter in place. Traced
            # only (jax.eval_shape), as `build`: compiling 20-odd programs would take a minute.
            shape, classes, _ = data.spec(config)
            batch = (jax.ShapeDtypeStruct((2, *shape), np.float32), jax.ShapeDtypeStruct((2,), np.int32))  # fmt: skip
            new, m = jax.eval_shape(train.train_step, state, batch, jax.random.PRNGKey(0))
            assert jax.tree.leaves(state.params) and m["loss"].shape == ()
            logits = jax.eval_shape(lambda s, x: s.apply_fn({"params": s.params, "batch_stats": s.batch_stats}, x, train=False), state, batch[0])  # fmt: skip
            assert logits.shape == (2, classes)
            assert jax.tree.structure(new.params) == jax.tree.structure(state.params)
            assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, new.params, state.params)))  # fmt: skip


BAD_VALUES = [  # stage, flag, value, the message's start
    ("conv", "--model-channels", "", "--model-channels: must be positive sizes"),
    ("conv", "--model-channels", "12,0,32", "--model-channels: must be positive sizes"),
    (
        "conv",
        "--model-channels",
        "8,16",
        "--model-kernels: must be 2 positive sizes, one per layer",
    ),
    ("conv", "--model-kernels", "3,0,6", "--model-kernels: must be 3 positive sizes"),
    ("conv", "--model-strides", "1,2", "--model-strides: must be 3 positive sizes"),
    ("conv", "--model-strides", "1,-2,2", "--model-strides: must be 3 positive sizes"),
    ("conv", "--model-dense", "-1", "--model-dense: must be 0 (no hidden dense layer) or more"),
    ("conv", "--model-dropout", "1", "--model-dropout: must be in [0, 1)"),
    ("conv_bn", "--model-dropout", "-0.1", "--model-dropout: must be in [0, 1)"),
    ("dense_relu", "--model-features", ",", "--model-features: must be positive sizes"),
    ("dense_relu", "--model-features", "200,-1", "--model-features: must be positive sizes"),
    ("dense_relu", "--model-activation", "tanh", "--model-activation: must be one of relu, sigm"),
    ("dense_dropout", "--model-dropout", "1.5", "--model-dropout: must be in [0, 1)"),
    ("linear", "--model-name", "resnet", "--model-name: must be one of softmax, mlp, conv"),
    ("linear", "--opt-name", "lamb", "--opt-name: must be one of sgd, adam"),
    ("linear", "--opt-lr", "0", "--opt-lr: must be positive"),
    ("linear", "--opt-decay", "0", "--opt-decay: must be in (0, 1]"),
    ("linear", "--opt-schedule", "step", "--opt-schedule: must be one of exponential, onecycle"),
    ("linear", "--dtype", "float16", "--dtype: must be float32 or bfloat16"),
    ("linear", "--batch-size", "0", "--batch-size: must be at least 1"),
    ("linear", "--epochs", "0", "--epochs: must be at least 1"),
    ("linear", "--data-augment-shift", "9", "--data-augment-shift: must be in 0..8 pixels"),
]


@pytest.mark.parametrize("name,flag,value,message", BAD_VALUES)
def test_bad_values_of_each_field_are_one_line(name, flag, value, message):
    config = flags.parse_config(stage_config(name), [flag, value])
    with pytest.raises(ConfigError) as e:
        build(config)
    assert "\n" not in str(e.value) and str(e.value).startswith(message), str(e.value)


def test_a_flag_mix_up_exits_2_with_one_line(tmp_path):
    """The exit path, once, in a process of its own: no traceback."""
    cmd = [sys.executable, "-m", "experiments.conv_bn", "--model-name", "mlp", "--workdir", str(tmp_path / "w")]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: --model-name mlp: the mlp model has no --model-batch-norm, --model-bn-momentum, "
        "--model-channels, --model-dense, --model-gap, --model-kernels, --model-padding, --model-pool, "
        "--model-strides (set by the stage or a flag); its "
        "fields are --model-features, --model-activation, --model-dropout; use a stage built on "
        "that model"
    ]
    assert not (tmp_path / "w").exists()
