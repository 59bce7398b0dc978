"""optuna-dashboard (from the package index) reads a MergeSearch study: trials, learning curves, the front.

A MergeSearch study is a plain Optuna study, so the dashboard users already run works on it. The test
runs a search to its end on SQLite and on PostgreSQL, starts the real `optuna-dashboard` server on the
same database, and reads what it serves through its HTTP API.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.search.searches import make_controller, manifest, run_to_end
from tests.search.synthetic import SyntheticExecutor

DASHBOARD = Path(sys.executable).with_name("optuna-dashboard")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dashboard(storage_url: str):
    port = _free_port()
    process = subprocess.Popen(
        [str(DASHBOARD), storage_url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/meta", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"optuna-dashboard did not start: {process.stderr.read()!r}") from None
                time.sleep(0.2)
        yield lambda path: json.loads(urllib.request.urlopen(f"{base}{path}", timeout=30).read())
    finally:
        process.terminate()
        process.wait(timeout=10)


def _study_detail(get, name: str) -> dict:
    [summary] = [s for s in get("/api/studies")["study_summaries"] if s["study_name"] == name]
    return get(f"/api/studies/{summary['study_id']}")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_optuna_dashboard_reads_trials_and_learning_curves(database, sqlite_url, postgres):
    url = sqlite_url if database == "sqlite" else postgres.create_database(f"dashboard_{database}")
    controller = make_controller(manifest(), url, SyntheticExecutor())
    run_to_end(controller)
    trials = {t.number: t for t in controller.study.trials}
    with dashboard(url) as get:
        detail = _study_detail(get, "synthetic")
    served = {t["number"]: t for t in detail["trials"]}
    assert served.keys() == trials.keys()
    assert detail["has_intermediate_values"]
    for number, trial in trials.items():
        assert served[number]["state"].lower() == trial.state.name.lower()
        curve = {int(v["step"]): v["value"] for v in served[number]["intermediate_values"]}
        assert curve == pytest.approx(trial.intermediate_values)
    pruned = [t for t in trials.values() if t.state == TrialState.PRUNED]
    assert pruned and all(len(t.intermediate_values) >= 1 for t in pruned)
    assert [t["number"] for t in detail["best_trials"]] == [controller.study.best_trial.number]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_optuna_dashboard_reads_the_pareto_front(database, sqlite_url, postgres):
    url = sqlite_url if database == "sqlite" else postgres.create_database(f"dashboard_front_{database}")
    controller = make_controller(manifest(search={"objectiveMode": "pareto"}), url, SyntheticExecutor())
    status = run_to_end(controller)
    with dashboard(url) as get:
        detail = _study_detail(get, "synthetic")
    assert len(detail["directions"]) == len(controller.tasks)
    front = sorted(t["number"] for t in detail["best_trials"])
    assert front == sorted(t.number for t in controller.study.best_trials)
    assert {entry["trial"] for entry in status.front} <= set(front)
