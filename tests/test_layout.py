"""The checkpoint layout: versioned, carrying its recipe, every older layout still readable, and
every item Orbax parses screened for damage."""

import json
import shutil

import jax
import pytest

import mnist_jax
from mnist_jax import checkpoint, evaluate
from tests.conftest import ROOT
from tests.helpers import inprocess

LAYOUT1 = ROOT / "tests" / "fixtures" / "layout1_linear"  # written by the code of layout 1
LAYOUT2 = ROOT / "tests" / "fixtures" / "layout2_linear"  # and of layout 2
SMALL = ["--data-train-limit", "256", "--data-test-limit", "256", "--plots", "false"]


def run(capsys, mnist_dir, workdir, *extra):
    return inprocess.stage(capsys, *SMALL, "--data-dir", mnist_dir, "--workdir", workdir, *extra)


def layout(step_dir) -> int:
    item = step_dir / "run" / "metadata"  # JsonSave names its file so
    return json.loads(item.read_text())["layout"] if item.exists() else 1


@pytest.mark.parametrize("fixture, written", [(LAYOUT1, 1), (LAYOUT2, 2)])
def test_an_older_layouts_run_is_read_resumed_and_goes_on_in_the_new_layout(mnist_dir, tmp_path, capsys, fixture, written):  # fmt: skip
    shutil.copytree(fixture, tmp_path, dirs_exist_ok=True)
    assert [layout(tmp_path / "checkpoints" / str(s)) for s in checkpoint.steps(tmp_path)] == [written]
    assert checkpoint.layout(tmp_path / "checkpoints" / "2") == written
    assert mnist_jax.restore(tmp_path).step == 2
    capsys.readouterr()
    evaluate.main(["--workdir", str(tmp_path), "--data-dir", str(mnist_dir)])
    assert "step 2: test accuracy" in capsys.readouterr().out
    code, out, err = run(capsys, mnist_dir, tmp_path, "--epochs", "2")
    assert code == 0 and "Resumed" in out and "at step 2" in out, err
    assert layout(tmp_path / "checkpoints" / "4") == checkpoint.LAYOUT
    assert not (tmp_path / checkpoint.DAMAGED).exists()


def test_a_layout_1_run_without_config_json_is_refused_not_guessed(mnist_dir, tmp_path, capsys):
    shutil.copytree(LAYOUT1, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").unlink()
    code, _, err = run(capsys, mnist_dir, tmp_path, "--epochs", "2")
    assert code == 2 and "no config.json, and its checkpoints" in err and "put config.json back" in err  # fmt: skip


def test_config_json_gone_the_checkpoint_still_refuses_another_recipe_and_writes_it_back(mnist_dir, tmp_path, capsys):  # fmt: skip
    assert run(capsys, mnist_dir, tmp_path, "--epochs", "1")[0] == 0
    written = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    for other in (["--opt-lr", "0.5"], ["--data-train-limit", "512"]):
        code, _, err = run(capsys, mnist_dir, tmp_path, "--epochs", "2", *other)
        assert code == 2 and "holds a run of another recipe" in err, err
        assert not (tmp_path / "config.json").exists()  # refused before anything is written
    code, out, err = run(capsys, mnist_dir, tmp_path, "--epochs", "2")
    assert code == 0 and "is missing; the recipe is read from checkpoint 2" in out, err
    assert "Resumed" in out
    again = json.loads((tmp_path / "config.json").read_text())
    assert {k: v for k, v in again.items() if k != "epochs"} == {k: v for k, v in written.items() if k != "epochs"}  # fmt: skip


def test_a_damaged_metrics_item_is_moved_aside_and_every_command_goes_on(mnist_dir, tmp_path, capsys):  # fmt: skip
    """Orbax parses every step's `metrics` item when a manager opens: one emptied item used to
    stop training, evaluate, plots and predict alike."""
    assert run(capsys, mnist_dir, tmp_path, "--epochs", "2", "--checkpoint-every", "1")[0] == 0
    steps = checkpoint.steps(tmp_path)
    oldest = steps[-1]
    (tmp_path / "checkpoints" / str(oldest) / "metrics" / "metrics").write_text("")
    assert checkpoint.screen(tmp_path) == [(oldest, "JSONDecodeError in its metrics item")]
    with pytest.raises(FileNotFoundError, match="damaged checkpoint"):
        mnist_jax.restore(tmp_path)  # a reader moves nothing: it says so in one line
    code, out, err = run(capsys, mnist_dir, tmp_path, "--epochs", "3")
    assert code == 0 and f"checkpoint {tmp_path / 'checkpoints' / str(oldest)} is damaged" in err, err  # fmt: skip
    assert (tmp_path / checkpoint.DAMAGED / str(oldest)).is_dir()
    assert mnist_jax.restore(tmp_path).step == 6


def test_a_field_added_to_the_state_is_saved_and_resumes_bit_exactly(mnist_dir, tmp_path, monkeypatch):
    """A researcher's field (here a count of the steps taken, kept by their own step) is data
    in the state: checkpointed and restored with no edit to the checkpoint code."""
    from typing import Any

    import jax.numpy as jnp
    import numpy as np

    from experiments import linear
    from mnist_jax import loop, train

    class CountingState(train.TrainState):
        count: Any = None

    create = train.create_train_state
    monkeypatch.setattr(train, "create_train_state", lambda *a, **k: CountingState(**vars(create(*a, **k)), count=jnp.int32(0)))  # fmt: skip

    def step(state, batch, rng):
        state, metrics = train.train_step(state, batch, rng)
        return state.replace(count=state.count + 1), metrics

    def config(epochs):
        c = linear.get_config()
        c.update(epochs=epochs, plots=False, steps_per_call=1)
        c.data.update(dir=str(mnist_dir), train_limit=512, test_limit=256)
        return c

    whole = loop.train(config(2), [tmp_path / "whole"], step_fn=step)
    loop.train(config(1), [tmp_path / "split"], step_fn=step)
    resumed = loop.train(config(2), [tmp_path / "split"], step_fn=step)
    assert int(resumed.runs[0].state.count) == 2 * 512 // 128  # not 4 again
    a, b = (r.runs[0].state for r in (whole, resumed))
    for x, y in zip(jax.tree.leaves(checkpoint.items(a)), jax.tree.leaves(checkpoint.items(b))):
        np.testing.assert_array_equal(x, y)
