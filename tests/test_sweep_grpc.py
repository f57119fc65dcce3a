"""Stores that keep no heartbeats (a journal file, the gRPC storage proxy): a worker's trial is
kept alive by a BEAT attribute, and one without it for the grace period is failed and queued
again, as Optuna's own heartbeats do on an RDB store."""

import time

import optuna
from optuna.trial import TrialState

from mnist_jax import sweep as sweep_lib


def test_a_trial_without_a_beat_for_the_grace_period_is_failed_and_queued_again(tmp_path):
    backend = optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log"))
    study = optuna.create_study(
        storage=optuna.storages.JournalStorage(backend), direction="maximize"
    )
    dead, alive = study.ask(), study.ask()
    for trial in (dead, alive):
        trial.suggest_float("x", 0, 1)
    beat = sweep_lib.Heartbeat(study, [alive._trial_id], interval=1)  # records BEAT at once
    try:
        time.sleep(0.2)
        study._storage.set_trial_system_attr(dead._trial_id, sweep_lib.BEAT, time.time() - 10)
        sweep_lib.fail_stale(study, interval=1)
        sweep_lib.fail_stale(study, interval=1)  # a second look finds it failed: no second retry
    finally:
        beat.close()
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    retry = study.get_trials()[2]
    assert retry.system_attrs["failed_trial"] == dead.number and retry.params == dead.params
