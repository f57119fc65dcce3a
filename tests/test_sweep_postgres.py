"""A study on a real PostgreSQL server (tests/helpers/postgres.py) shared by three worker
processes, as on a cluster: one is killed mid-trial, one paused past the grace period and
continued; every trial still trains once, in one process at a time, and the table is whole."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from mnist_jax import sweep as sweep_lib
from tests.conftest import ROOT

TRIALS, EPOCHS = 10, 4
# One trial trains 4 epochs of 9,000 images in about 1.5 s here: the first worker runs a few
# before the other two have started (imports, data, a cached compile: 6-10 s).
RECIPE = ["--epochs", str(EPOCHS), "--data-train-limit", "10000", "--data-val-split", "1000",
          "--data-test-limit", "1000", "--batch-size", "20", "--pruner", "none", "--batch-trials", "1",
          "--plots", "false", "--heartbeat", "1"]  # fmt: skip
TRIAL_LINE = re.compile(r"^trial (\d+): .* in (\S+)( \(resumed\))?$", re.M)


def worker(url, workdir, mnist_dir, log, trials=TRIALS):
    command = [sys.executable, "-m", "experiments.sweep", "dense_relu", "--trials", str(trials),
               "--storage", url, "--workdir", str(workdir), "--data-dir", str(mnist_dir), *RECIPE]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line in its log as it is said
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # fmt: skip


def epochs(trial_dir):
    path = trial_dir / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")] if path.exists() else []  # fmt: skip


def stop_mid_trial(proc, log, deadline):
    """SIGSTOP `proc` inside its current trial, with 1 to EPOCHS - 1 epochs written (checked
    while it is stopped, so the trial is certainly unfinished): (trial number, its directory)."""
    while time.time() < deadline:
        found = TRIAL_LINE.findall(log.read_text())
        if found and 1 <= len(epochs(Path(found[-1][1]))) < EPOCHS:
            proc.send_signal(signal.SIGSTOP)
            number, trial_dir = int(found[-1][0]), Path(found[-1][1])
            if TRIAL_LINE.findall(log.read_text())[-1][0] == str(number) and 1 <= len(epochs(trial_dir)) < EPOCHS:  # fmt: skip
                return number, trial_dir
            proc.send_signal(signal.SIGCONT)  # its trial ended meanwhile: the next one
        time.sleep(0.01)
    pytest.fail(f"{log.name}: no trial caught mid-way:\n{log.read_text()[-3000:]}")


def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"waited {timeout}s for {what}")
        time.sleep(0.05)


@pytest.mark.after_suite  # processes killed and paused: run by .ci/run after the suite
def test_three_workers_share_a_study_on_postgres_through_a_kill_and_a_pause(postgres, mnist_dir, tmp_path):  # fmt: skip
    url = postgres.database("three_workers")
    workdir = tmp_path / "s"  # the workers' one work directory, as on a shared filesystem
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    first = worker(url, workdir, mnist_dir, logs[0])
    procs = [first]
    try:
        # The study made by one worker: its creation racing two others' is another matter.
        wait_for(lambda: TRIAL_LINE.search(logs[0].read_text()), "the first worker's first trial")
        procs += [worker(url, workdir, mnist_dir, log) for log in logs[1:]]
        killed, paused = procs[1], procs[2]
        deadline = time.time() + 180
        k, k_dir = stop_mid_trial(killed, logs[1], deadline)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        p, p_dir = stop_mid_trial(paused, logs[2], deadline)
        try:  # paused until its trial is failed as stale and its retry finds the directory held
            stopped = time.time()
            held = f"is held by process {paused.pid}"
            wait_for(lambda: any(held in log.read_text() for log in logs[:2]), f"'{held}'")
            time.sleep(max(0.0, stopped + 4 - time.time()))  # and past the 2 s grace
        finally:
            paused.send_signal(signal.SIGCONT)
        codes = [first.wait(timeout=300), paused.wait(timeout=300)]
    finally:
        for proc in procs:
            if proc.poll() is None:  # a failed wait: none left behind, stopped or not
                proc.kill()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], text
    study = optuna.load_study(study_name="dense_relu", storage=url)
    by_state = {s: [t.number for t in study.trials if t.state == s] for s in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == TRIALS, text  # the budget, exactly
    assert sorted(by_state[TrialState.FAIL]) == sorted([k, p]), text  # the originals, re-queued
    assert sum(map(len, by_state.values())) == len(study.trials)  # nothing running or waiting
    retry = {f: [r for r in study.trials if r.system_attrs.get("failed_trial") == f] for f in (k, p)}  # fmt: skip
    survivors = text[0] + text[2]
    for f, f_dir in ((k, k_dir), (p, p_dir)):  # each retried once, resumed in its own directory
        assert len(retry[f]) == 1 and retry[f][0].state == TrialState.COMPLETE, (f, text)
        assert retry[f][0].user_attrs["workdir"] == str(f_dir) == study.trials[f].user_attrs["workdir"]  # fmt: skip
        assert retry[f][0].params == study.trials[f].params
        assert re.search(rf"^trial {retry[f][0].number}: .* in {re.escape(str(f_dir))} \(resumed\)$", survivors, re.M), text  # fmt: skip
    # The paused one's retry waited for the directory; the continued worker stopped and left it.
    assert f"trial {retry[p][0].number}: {p_dir} is held by process {paused.pid}" in survivors, text  # fmt: skip
    assert re.search(rf"^trial {p}: failed as stale by another process .* its run stopped after epoch \d", text[2], re.M), text[2]  # fmt: skip
    # Every trial trained each epoch once, in one process at a time, nothing half-written.
    dirs = sorted(workdir.glob("trial_*"))
    assert {str(d) for d in dirs} == {study.trials[n].user_attrs["workdir"] for n in by_state[TrialState.COMPLETE]}  # fmt: skip
    assert len(dirs) == TRIALS
    for d in dirs:
        assert epochs(d) == list(range(1, EPOCHS + 1)), d
        steps = [json.loads(line)["step"] for line in (d / "train_steps.jsonl").read_text().splitlines()]  # fmt: skip
        assert steps == sorted(set(steps)), d
    assert not list(workdir.glob("**/*.orbax-checkpoint-tmp*"))
    # The table, written by the last worker to finish: every trial.
    table = json.loads((workdir / "sweep.json").read_text())["trials"]
    states = {t.number: "complete" if t.state == TrialState.COMPLETE else "re-queued" for t in study.trials}  # fmt: skip
    assert {r["trial"]: r["state"] for r in table} == states and len(table) == len(states)


def test_a_trial_failed_between_its_read_and_its_report_stops_the_run(monkeypatch):
    """The pause's narrowest window, which the test above hit in one of four runs here: the worker
    read its trial RUNNING, was paused, and another failed it before the report. The trial is
    lost (the run stops after this epoch), not a crash (UpdateFinishedTrialError, exit 1)."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    read = study.trials[0]  # RUNNING, as read before the pause
    study.tell(trial, state=TrialState.FAIL)  # failed as stale by another process
    monkeypatch.setattr(sweep_lib, "_frozen", lambda study, number: read)
    lost, run = {}, SimpleNamespace(stop=None, row={"epoch": 2}, evaluation={"val": {"accuracy": np.float32(0.9)}})
    report = sweep_lib.Report([trial], [[0]], {}, lost)
    report.on_epoch_end(SimpleNamespace(runs=[run], primary=True))
    assert lost == {0: 2} and run.stop == "epoch"
