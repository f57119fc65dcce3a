"""Stores that keep no heartbeats (a journal file, the gRPC storage proxy): a worker's trial is
kept alive by a BEAT attribute, and one without it for the grace period is failed and queued
again, as Optuna's own heartbeats do on an RDB store."""

import socket
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from mnist_jax import sweep as sweep_lib
from tests.conftest import ROOT
from tests.test_sweep_postgres import EPOCHS, TRIAL_LINE, epochs, stop_mid_trial, wait_for, worker


def test_a_trial_without_a_beat_for_the_grace_period_is_failed_and_queued_again(tmp_path):
    backend = optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log"))
    study = optuna.create_study(storage=optuna.storages.JournalStorage(backend), direction="maximize")
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


@pytest.mark.after_suite  # processes killed: run by .ci/run after the suite
def test_two_workers_through_the_grpc_proxy_and_a_killed_ones_trial_runs_again(postgres, mnist_dir, tmp_path):  # fmt: skip
    """experiments.study_server serves a PostgreSQL study on loopback; two workers reach it by
    grpc://. One is killed mid-trial: the proxy keeps no heartbeats, so the other finds its
    trial silent (BEAT) past the grace period, fails it and resumes it in its directory."""
    url = postgres.database("grpc_proxy")
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "experiments.study_server", "--storage", url, "--port", str(port)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    workdir, logs, procs = tmp_path / "s", [tmp_path / f"w{i}.log" for i in range(2)], []
    try:
        assert "serving" in server.stdout.readline()
        grpc_url = f"grpc://127.0.0.1:{port}"
        procs.append(worker(grpc_url, workdir, mnist_dir, logs[0], trials=4))
        wait_for(lambda: TRIAL_LINE.search(logs[0].read_text()), "the first worker's first trial")
        procs.append(worker(grpc_url, workdir, mnist_dir, logs[1], trials=4))
        number, trial_dir = stop_mid_trial(procs[0], logs[0], time.time() + 180)
        procs[0].kill()
        procs[0].wait()
        assert procs[1].wait(timeout=300) == 0, logs[1].read_text()[-3000:]
    finally:
        for p in [*procs, server]:
            p.kill()
            p.wait()
    later = logs[1].read_text()
    retried = [t for t in optuna.load_study(study_name="dense_relu", storage=url).trials if t.system_attrs.get("failed_trial") == number]  # fmt: skip
    assert len(retried) == 1 and retried[0].user_attrs["workdir"] == str(trial_dir), later
    assert f"trial {retried[0].number}: " in later and f"in {trial_dir} (resumed)" in later, later
    assert epochs(trial_dir) == list(range(1, EPOCHS + 1))  # the killed one's epochs, then the rest
    study = optuna.load_study(study_name="dense_relu", storage=url)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1, states


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--storage", "nosuch://x"], "--storage nosuch://x: cannot open"),
        (["--storage", "postgresql://u:secret@/db?host=/nonexistent"], "--storage postgresql://u:***@/db"),
        (["--storage", "sqlite:///x.db", "--port", "0"], "--port: a port number, 1-65535, got 0"),
        (
            ["--storage", "sqlite:///x.db", "--host", "203.0.113.9"],
            "--host 203.0.113.9 --port 13000: cannot listen there",
        ),  # fmt: skip
    ],
)
def test_the_study_servers_bad_input_is_one_line(argv, message, tmp_path, capsys, monkeypatch):
    from experiments import study_server

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        study_server.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and message in err and "secret" not in err, err
