"""Sweep promises with no other test: a SIGTERM to a worker saves the trial and queues it again,
so that the same command goes on; --trial-seeds scores a trial by its seeds' median; a journal
file holds a study; conv_bn's and conv_best's own spaces (`python -m experiments.sweep STAGE`)
parse. linear on real MNIST, tiny budgets."""

import functools
import json
import os
import signal
import statistics

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from experiments import conv_best, conv_bn
from experiments import sweep as sweep_cmd
from mnist_jax import checkpoint, flags, loop, metrics, models
from mnist_jax import sweep as sweep_lib
from mnist_jax.config import validate
from mnist_jax.hooks import Hook

# 1,000 training images less 500 held out for validation: 5 steps an epoch of 100.
SMALL = ["--epochs", "2", "--data-train-limit", "1000", "--data-val-split", "500",
         "--data-test-limit", "500", "--batch-size", "100", "--plots", "false"]  # fmt: skip


def sweep(mnist_dir, workdir, *extra) -> dict:
    return sweep_cmd.main(["linear", "--space", "opt.lr=loguniform(1e-3,1e-1)", "--workdir",
                           str(workdir), "--data-dir", str(mnist_dir), *SMALL, *extra])  # fmt: skip


class SigtermAt(Hook):
    """Send this process a SIGTERM, as a scheduler does, once, when the run in `trial` has
    reached `step`: the stage's own handler (hooks.Preemption) hears it."""

    def __init__(self, trial: str, step: int):
        self.trial, self.step, self.sent = trial, step, False

    def after_steps(self, run, metrics):
        if not self.sent and run.workdir.name == self.trial and run.step == self.step:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_saves_the_trial_and_requeues_it_and_the_same_command_goes_on(mnist_dir, tmp_path, monkeypatch, capsys):  # fmt: skip
    """SIGTERM in trial 1's second epoch (step 7 of 10): exit 143 with one line; trial 0 stays
    complete, trial 1 is failed (no error of its own: re-queued) with a checkpoint at the stop;
    the same command resumes it in trial_1/ from there, with its parameters, and the study ends
    with its 2 trials complete, each epoch trained once."""
    work = tmp_path / "s"
    kill = SigtermAt("trial_1", 7)
    defaults = loop.defaults
    monkeypatch.setattr(loop, "defaults", lambda save=True: [*defaults(save), kill])
    with pytest.raises(SystemExit) as e:
        sweep(mnist_dir, work, "--trials", "2", "--pruner", "none", "--log-every", "1")
    err = capsys.readouterr().err
    assert kill.sent and e.value.code == 128 + signal.SIGTERM, err
    assert err.count("\n") == 1 and err.startswith("error: interrupted (SIGTERM) at step 7;")
    assert "the interrupted ones are queued again: run the same command to continue" in err
    assert checkpoint.steps(work / "trial_1")[0] == 7  # saved at the stop (after its hooks ran), mid-epoch
    storage = f"sqlite:///{work / 'study.db'}"
    study = optuna.load_study(study_name="linear", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]  # fmt: skip
    assert "error" not in study.trials[1].user_attrs  # failed by the stop, not by itself
    monkeypatch.setattr(loop, "defaults", defaults)

    out = sweep(mnist_dir, work, "--trials", "2", "--pruner", "none", "--log-every", "1")
    printed = capsys.readouterr().out
    assert f"trial 2: opt.lr={sweep_lib._show(study.trials[1].params['opt.lr'])} in {work / 'trial_1'} (resumed)" in printed  # fmt: skip
    assert "Resumed" in printed and "at step 7" in printed
    study = optuna.load_study(study_name="linear", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    retry = study.trials[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == study.trials[1].params
    assert retry.user_attrs["workdir"] == str(work / "trial_1")
    rows = metrics.read(work / "trial_1" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and retry.value == rows[-1]["val_accuracy"]
    assert [r["state"] for r in out["trials"]] == ["complete", "re-queued", "complete"]


def test_trial_seeds_score_a_trial_by_the_median_in_a_journal_study(mnist_dir, tmp_path, monkeypatch):
    """--trial-seeds 3 --storage journal:PATH: each seed is a run in trial_0/seed_<s>/; the
    trial's value is the median of their final validation accuracies (its test accuracy, the
    median of theirs); the study lives in the journal file (no study.db), and the same command
    with --trials 2 continues it there."""
    # A seeded sampler: the rate it draws gives 3 different accuracies (an unseeded one drew a rate
    # where two of the seeds tied on the 500 images, so the median could not be told from a seed).
    monkeypatch.setattr(optuna.samplers, "TPESampler", functools.partial(optuna.samplers.TPESampler, seed=0))
    work, journal = tmp_path / "s", tmp_path / "study.log"
    args = ["--trial-seeds", "3", "--storage", f"journal:{journal}"]
    sweep(mnist_dir, work, "--trials", "1", *args)
    finals = [metrics.read(work / "trial_0" / f"seed_{s}" / "metrics.jsonl")[-1] for s in range(3)]
    val = [r["val_accuracy"] for r in finals]
    assert len(set(val)) == 3, val  # three different values: the median is the middle one
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))  # fmt: skip
    trial = optuna.load_study(study_name="linear", storage=storage).trials[0]
    assert trial.state == TrialState.COMPLETE and trial.value == statistics.median(val)
    assert trial.user_attrs["test_accuracy"] == statistics.median(r["test_accuracy"] for r in finals)  # fmt: skip
    assert not (work / "study.db").exists()

    out = sweep(mnist_dir, work, "--trials", "2", *args)
    assert [r["state"] for r in out["trials"]] == ["complete", "complete"]
    assert json.loads((work / "sweep.json").read_text())["trials"][0]["val_accuracy"] == trial.value  # fmt: skip
    assert len(optuna.load_study(study_name="linear", storage=storage).trials) == 2


def test_conv_bns_own_sweep_space_parses():
    """conv_bn.get_sweep(), the space of `python -m experiments.sweep conv_bn`: five parameters
    of the kinds and ranges it names, each end a model and config that can train."""
    config = conv_bn.get_config()
    space = sweep_lib.parse_space(conv_bn.get_sweep(), config)
    assert space == {
        "model.channels[0]": IntDistribution(6, 18),
        "model.channels[1]": IntDistribution(12, 40),
        "model.channels[2]": IntDistribution(30, 64),
        "opt.lr": FloatDistribution(0.001, 0.05, log=True),
        "opt.decay": FloatDistribution(0.3, 0.95),
    }
    low = sweep_lib.trial_config(config, {k: d.low for k, d in space.items()})
    assert tuple(low.model.channels) == (6, 12, 30) and low.opt.lr == 0.001
    models.build(**low.model)
    assert not sweep_lib.batchable(space)  # widths change the program: one trial at a time


def test_conv_bests_own_sweep_space_names_its_fields_and_each_end_builds():
    """conv_best.get_sweep(), the space of `python -m experiments.sweep conv_best`: each parameter
    a field of the stage's config, each end a config that validates and a model that builds, and
    the choices keeping their fields' types (0.99 a float, 400 an int) in the trial's config."""
    config = conv_best.get_config()
    space = sweep_lib.parse_space(conv_best.get_sweep(), config)
    leaves = dict(flags.leaves(config))
    assert len(space) == 11 and all(name.split("[")[0] in leaves for name in space)
    for end in (0, -1):
        values = {k: d.choices[end] if hasattr(d, "choices") else (d.low, d.high)[end] for k, d in space.items()}
        trial = sweep_lib.trial_config(config, values)
        validate(trial)
        models.build(**trial.model)
        assert type(trial.model.dense) is int and type(trial.opt.ema) is float
    assert not sweep_lib.batchable(space)  # widths change the program: one trial at a time
