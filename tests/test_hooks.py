"""The loop extended from outside: hooks, step and evaluation metrics by name, and a train
function that leaves the process's settings as it found them."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import dense_relu, linear
from mnist_jax import hooks, loop, metrics, train


def small(mnist_dir, epochs=2):
    config = linear.get_config()
    config.data.dir, config.data.train_limit, config.data.test_limit = str(mnist_dir), 1280, 500
    config.epochs, config.plots, config.log_every = epochs, False, 5
    # One step a call on every backend (the CPU's default for a run this short; a GPU's is the whole
    # epoch, one sync an epoch): the host syncs at each --log-every, joining the calls between.
    config.steps_per_call = 1
    return config


class Calls(hooks.Hook):
    """Every call a hook gets, in order, with what it was given."""

    def __init__(self):
        self.calls = []

    def on_train_start(self, run):
        self.calls.append(("start", run.step))

    def after_steps(self, run, metrics):
        self.calls.append(("steps", run.step, metrics["loss"].shape))

    def on_epoch_end(self, run, row, evaluation):
        self.calls.append(("epoch", row["epoch"], float(evaluation["test"]["accuracy"])))

    def on_train_end(self, run):
        self.calls.append(("end", run.step, run.group.error))


def test_a_hook_sees_every_sync_and_epoch_in_order(mnist_dir, tmp_path):
    calls = Calls()
    run = loop.train(small(mnist_dir), [tmp_path], hooks=[calls])
    rows = metrics.read(tmp_path / "metrics.jsonl")
    # 10 steps an epoch, one a call, a host sync at each --log-every 5 steps.
    expected = [("start", 0)]
    for epoch, row in enumerate(rows, 1):
        expected += [("steps", 10 * epoch - 5, (5,)), ("steps", 10 * epoch, (5,))]
        expected += [("epoch", epoch, row["test_accuracy"])]
    assert calls.calls == expected + [("end", 20, None)]
    assert [r.row for r in run.runs] == [rows[-1]]


def test_a_step_metric_and_an_evaluation_metric_are_logged_by_name(mnist_dir, tmp_path):
    def step_with_grad_norm(state, batch, rng):
        new, m = train.train_step(state, batch, rng)
        return new, {**m, "update_norm": optax.tree.norm(jax.tree.map(jnp.subtract, new.params, state.params))}  # fmt: skip

    def per_class_accuracy(logits, labels):
        hits = jax.nn.one_hot(labels, 10) * (jnp.argmax(logits, -1) == labels)[:, None]
        return hits.sum(0) / jax.nn.one_hot(labels, 10).sum(0)

    config = small(mnist_dir, epochs=1)
    config.model = dense_relu.get_config().model
    run = loop.train(config, [tmp_path], step_fn=step_with_grad_norm,
                     eval_metrics={"per_class_accuracy": per_class_accuracy})  # fmt: skip
    (row,) = metrics.read(tmp_path / "metrics.jsonl")
    steps = metrics.read(tmp_path / "train_steps.jsonl")
    assert [r["step"] for r in steps] == [5, 10] and all(r["update_norm"] > 0 for r in steps)
    assert row["train_update_norm"] == np.mean([r["update_norm"] for r in steps])
    # per class: the hits over the class's test images, from the same predictions
    predictions, labels = (
        run.runs[0].evaluation["test"]["predictions"],
        np.asarray(run.arrays["test"][1]),
    )
    ratio = lambda hits, n: float(np.float32(hits) / np.float32(n))  # noqa: E731  (float32's)
    for c in range(10):
        mine = labels == c
        assert row[f"test_per_class_accuracy_{c}"] == ratio((predictions[mine] == c).sum(), mine.sum())  # fmt: skip
    assert row["test_accuracy"] == ratio((predictions == labels).sum(), len(labels))


def test_train_leaves_the_process_settings_as_it_found_them(mnist_dir, tmp_path):
    """debug_nans applies for the call only; the compilation cache and XLA's flags are the
    command's to set (startup.start), never the library's."""
    seen = []

    class DebugNans(hooks.Hook):
        def on_train_start(self, run):
            seen.append(jax.config.jax_debug_nans)

    loop.train(small(mnist_dir, epochs=1), [tmp_path / "first"])  # libraries' imports: env vars
    before = (jax.config.jax_debug_nans, jax.config.jax_compilation_cache_dir, dict(os.environ))
    for debug, cache in ((True, str(tmp_path / "cache_a")), (False, str(tmp_path / "cache_b"))):
        config = small(mnist_dir, epochs=1)
        config.debug_nans, config.compile_cache = debug, cache
        loop.train(config, [tmp_path / str(debug)], hooks=[DebugNans()])
        assert (jax.config.jax_debug_nans, jax.config.jax_compilation_cache_dir, dict(os.environ)) == before  # fmt: skip
    assert seen == [True, False]
    assert not (tmp_path / "cache_a").exists() and not (tmp_path / "cache_b").exists()


def test_live_curves_draw_the_schedule_first_then_redraw_within_their_budget(mnist_dir, tmp_path, monkeypatch):  # fmt: skip
    shown = []
    monkeypatch.setattr(hooks.LiveCurves, "_show", lambda self, key, path: shown.append(key))
    drawn = {}  # the curves file's steps at each redraw: read while training
    from mnist_jax import plots

    real = plots.curves
    monkeypatch.setattr(plots, "curves", lambda w, out, spe=None: (drawn.setdefault(len(drawn), len(metrics.read(w / "train_steps.jsonl"))), real(w, out, spe)))  # fmt: skip
    inline = hooks.LiveCurves(inline=True, budget=None)  # a notebook's, drawing at every sync
    loop.train(small(mnist_dir), [tmp_path / "a"], hooks=[inline])
    assert (tmp_path / "a/plots/schedule.png").exists() and (tmp_path / "a/plots/curves.png").exists()  # fmt: skip
    assert inline.draws == len(drawn) > 2 and shown[0] == "schedule" and shown.count("curves") == inline.draws  # fmt: skip
    assert list(drawn.values()) == sorted(drawn.values()) and drawn[0] < drawn[len(drawn) - 1]
    # A budget no redraw fits in: the first (which measures a redraw's cost) and the last epoch's,
    # which is always drawn; not the one between.
    tight = hooks.LiveCurves(budget=1e-9)
    loop.train(small(mnist_dir, epochs=3), [tmp_path / "b"], hooks=[tight])
    assert tight.draws == 2 and (tmp_path / "b/plots/curves.png").exists()


STAGE_FILE = '''"""dense_relu with its own hook and evaluation metric, passed to the stage's command."""

import jax.numpy as jnp

from experiments import dense_relu
from mnist_jax import cli, hooks


def get_config():
    return dense_relu.get_config()


def top2(logits, labels):  # the label among the two highest logits
    return (jnp.argsort(logits, axis=-1)[:, -2:] == labels[:, None]).any(-1).mean()


class Epochs(hooks.Hook):
    def on_epoch_end(self, run, row, evaluation):
        print(f"my hook: epoch {row['epoch']}, top-2 {row['test_top2']:.4f}")


if __name__ == "__main__":
    cli.run(get_config, hooks=[Epochs()], eval_metrics={"top2": top2})
'''


def test_a_stage_file_adds_a_hook_and_an_evaluation_metric(mnist_dir, tmp_path, monkeypatch, capsys):  # fmt: skip
    """No library edit: the stage file passes them to cli.run, with every flag still a flag."""
    import runpy
    import sys

    (tmp_path / "my_stage.py").write_text(STAGE_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["my_stage", "--epochs", "2", "--data-train-limit", "1280", "--data-test-limit", "500",
            "--data-dir", str(mnist_dir), "--plots", "false", "--workdir", str(tmp_path / "w")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_module("my_stage", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    rows = metrics.read(tmp_path / "w/metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:  # top-2 holds at least the top-1 hits, and is a fraction of the 500 images
        assert r["test_accuracy"] <= r["test_top2"] <= 1 and round(r["test_top2"] * 500, 3) % 1 == 0
        assert f"my hook: epoch {r['epoch']}, top-2 {r['test_top2']:.4f}" in out


def test_a_command_validates_and_resolves_its_config_once(mnist_dir, tmp_path, monkeypatch):
    """Two seeds in turn (two groups, a loop.train each): the config is validated once and the
    backend's choices made once, at the command's entry; the config itself stays as typed."""
    import sys

    from mnist_jax import cli, startup
    from mnist_jax import config as config_lib

    counts, real_validate, real_resolve = {"validate": 0, "resolve": 0}, config_lib.validate, startup.resolve

    def validate(config):
        counts["validate"] += 1
        return real_validate(config)

    def resolve(*args, **kwargs):
        counts["resolve"] += 1
        return real_resolve(*args, **kwargs)

    for module in [m for name, m in sys.modules.items() if name.startswith(("mnist_jax", "experiments"))]:
        if getattr(module, "validate", None) is real_validate:
            monkeypatch.setattr(module, "validate", validate)
    monkeypatch.setattr(startup, "resolve", resolve)
    typed = []
    monkeypatch.setattr(loop, "setup", lambda config, *a, real=loop.setup: (typed.append(config.to_dict()), real(config, *a))[1])  # noqa: E501
    cli.run(linear.get_config, ["--seeds", "2", "--seed-mode", "turn", "--epochs", "1", "--data-dir", str(mnist_dir),
            "--data-train-limit", "1280", "--data-test-limit", "500", "--plots", "false", "--workdir", str(tmp_path)])  # fmt: skip
    assert counts == {"validate": 1, "resolve": 1}
    assert len(typed) == 2 and typed[0]["seed_mode"] == "turn" and typed[0]["steps_per_call"] == 0 == typed[1]["steps_per_call"]  # noqa: E501
    assert [r["epoch"] for r in metrics.read(tmp_path / "seed_1/metrics.jsonl")] == [1]
