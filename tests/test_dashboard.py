"""Watching a study live: the documented `optuna-dashboard URL` serves a sweep's study, and its
trials read back over loopback are the study's."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna

from experiments import sweep as sweep_cmd
from tests.test_sweep import SMALL


def test_the_dashboard_serves_a_sweeps_trials_on_loopback(mnist_dir, tmp_path):
    workdir = tmp_path / "s"
    sweep_cmd.main(["dense_relu", "--trials", "2", "--workdir", str(workdir), "--data-dir", str(mnist_dir),
                    "--plots", "false", *SMALL])  # fmt: skip
    url = f"sqlite:///{workdir / 'study.db'}"
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = Path(sys.executable).parent / "optuna-dashboard"  # the command the documents give
    server = subprocess.Popen([str(command), url, "--port", str(port), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        get = lambda path: json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read())  # noqa: E731  # fmt: skip
        deadline, studies = time.time() + 60, None
        while studies is None and time.time() < deadline and server.poll() is None:
            try:
                studies = get("/api/studies")["study_summaries"]
            except OSError:
                time.sleep(0.2)
        assert studies is not None, server.communicate(timeout=5)[0]
        (summary,) = studies
        assert summary["study_name"] == "dense_relu"
        served = get(f"/api/studies/{summary['study_id']}")["trials"]
        study = optuna.load_study(study_name="dense_relu", storage=url)
        assert [(t["number"], t["state"].lower(), t["values"]) for t in served] == [
            (t.number, t.state.name.lower(), t.values) for t in study.trials
        ]
        assert all(t["state"] == "Complete" for t in served) and len(served) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)
