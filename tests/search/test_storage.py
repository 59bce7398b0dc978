"""The study in real databases: SQLite for one machine, PostgreSQL for the cluster."""

from __future__ import annotations

import multiprocessing

import optuna
import pytest
from optuna.trial import TrialState

from mergesearch_operator.search.study import make_storage
from mergesearch_operator.spaces import LayerwiseFusion
from tests.search.searches import FACTS, make_controller, manifest, run_to_end
from tests.search.synthetic import SyntheticExecutor


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_search_runs_and_resumes_on_a_real_database(database, sqlite_url, postgres):
    url = sqlite_url if database == "sqlite" else postgres.create_database(f"resume_{database}")
    executor = SyntheticExecutor()
    document = manifest(budget={"maxTrials": 12, "parallelTrials": 3})
    first = make_controller(document, url, executor)
    for _ in range(10):
        first.reconcile()
    status = run_to_end(make_controller(document, url, executor))  # a new process would do the same
    assert status.phase == "Succeeded" and sum(status.trials.values()) == 12
    assert len(executor.started) == len(set(executor.started))
    intermediate = [t.intermediate_values for t in optuna.load_study(study_name="synthetic", storage=url).trials]
    assert any(len(values) >= 2 for values in intermediate)  # rung scores reach the dashboard


def _worker(url: str, trials: int) -> None:
    study = optuna.load_study(study_name="concurrent", storage=make_storage(url))
    space = LayerwiseFusion(FACTS, methods=["linear", "ties"], tensor_groups=["mlp"], groups=2)
    for _ in range(trials):
        trial = study.ask()
        plan = space.suggest(trial)
        trial.set_user_attr("layers", plan.num_layers)
        study.tell(trial, float(trial.number % 7))


def test_concurrent_workers_against_postgresql(postgres):
    url = postgres.create_database("concurrent")
    optuna.create_study(study_name="concurrent", storage=make_storage(url), direction="maximize")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(url, 15)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    trials = optuna.load_study(study_name="concurrent", storage=url).trials
    assert len(trials) == 60
    assert sorted(t.number for t in trials) == list(range(60))
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["layers"] == 4 for t in trials)
