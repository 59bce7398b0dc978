"""The single-writer storage passes Optuna's own storage contract suite, on SQLite, and resumes from the database."""

from __future__ import annotations

import optuna
import pytest
from optuna.testing.pytest_storages import StorageTestCase

from mergesearch_operator.search.storage import SingleWriterStorage


class TestSingleWriterStorage(StorageTestCase):
    @pytest.fixture
    def storage(self, tmp_path):
        return SingleWriterStorage(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}"))


def test_what_it_writes_is_in_the_database_for_the_next_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=SingleWriterStorage(optuna.storages.RDBStorage(url)))
    study.enqueue_trial({"x": 0.5})
    study.optimize(lambda t: t.suggest_float("x", 0, 1) ** 2, n_trials=5)
    trial = study.ask()
    trial.set_user_attr("note", {"rung": 1})
    reread = optuna.load_study(study_name="s", storage=url)  # an ordinary storage, as another process sees it
    assert [t.params for t in reread.trials] == [t.params for t in study.trials]
    assert reread.trials[0].params == {"x": 0.5}
    assert (
        reread.trials[-1].user_attrs == {"note": {"rung": 1}}
        and reread.trials[-1].state == optuna.trial.TrialState.RUNNING
    )
    resumed = optuna.load_study(study_name="s", storage=SingleWriterStorage(optuna.storages.RDBStorage(url)))
    assert [t.number for t in resumed.trials] == list(range(6))
    assert resumed.best_value == reread.best_value
