"""The single-writer storage passes Optuna's own storage contract suite, on SQLite, and resumes from the database."""

from __future__ import annotations

import sqlite3

import optuna
import pytest
from optuna.testing.pytest_storages import StorageTestCase

from mergesearch_operator.search.storage import SingleWriterStorage, StorageDiverged


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


def test_trials_asked_in_one_write_reach_the_database_whole_when_the_block_ends(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = SingleWriterStorage(optuna.storages.RDBStorage(url))
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)  # written through, call by call

    def in_database() -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name="s", storage=url).trials

    with storage.in_one_transaction():
        filled = study.ask()
        filled.suggest_float("x", 0, 1)
        filled.suggest_categorical("method", ["ties", "slerp"])
        filled.set_user_attr("ready", True)
        skipped = study.ask()
        skipped.suggest_float("x", 0, 1)
        study.tell(skipped, state=optuna.trial.TrialState.PRUNED)
        finished = study.ask()
        finished.report(0.125, step=10)
        storage.set_trial_system_attr(finished._trial_id, "origin", {"by": "test"})
        study.tell(finished, float("inf"))
        assert len(in_database()) == 2  # nobody outside has seen the new trials yet
    written = in_database()
    assert [t.number for t in written] == [0, 1, 2, 3, 4]
    assert written[2].params == study.trials[2].params and set(written[2].params) == {"x", "method"}
    assert written[2].user_attrs == {"ready": True} and written[2].state == optuna.trial.TrialState.RUNNING
    assert written[3].state == optuna.trial.TrialState.PRUNED
    assert written[4].intermediate_values == {10: 0.125} and written[4].value == float("inf")
    assert written[4].system_attrs == {"origin": {"by": "test"}} and written[4].datetime_complete is not None
    assert [t.datetime_start for t in written] == [t.datetime_start for t in study.trials]
    study.tell(filled, 0.5)  # later writes go through as usual
    assert in_database()[2].value == 0.5

    with pytest.raises(RuntimeError, match="boom"), storage.in_one_transaction():
        study.ask().set_user_attr("half", True)
        raise RuntimeError("boom")
    assert in_database()[5].user_attrs == {"half": True}  # kept: numbering stays in step with the database


def test_a_second_writer_is_detected_rather_than_misnumbering_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = SingleWriterStorage(optuna.storages.RDBStorage(url))
    study = optuna.create_study(study_name="s", storage=storage)
    optuna.load_study(study_name="s", storage=url).ask()  # another process adds trial 0 behind our back
    with pytest.raises(RuntimeError, match="another process"), storage.in_one_transaction():
        study.ask()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_finished_runs_writes_reach_the_database_together_and_match_the_memory_copy(database, tmp_path, postgres):
    url = f"sqlite:///{tmp_path / 'study.db'}" if database == "sqlite" else postgres.create_database("one_write")
    storage = SingleWriterStorage(optuna.storages.RDBStorage(url))
    study = optuna.create_study(study_name="s", storage=storage)
    promoted, ended = study.ask(), study.ask()
    promoted.set_user_attr("result.r0", {"tasks": {"a": [1, 2]}})

    def stored(number: int) -> optuna.trial.FrozenTrial:
        return optuna.load_study(study_name="s", storage=url).trials[number]

    with storage.in_one_transaction():
        promoted.set_user_attr("result.r0", {"tasks": {"a": [3, 4]}})  # overwritten: one row, the last value
        promoted.report(0.75, step=20)
        promoted.set_user_attr("decision.r0", "promote")
        storage.set_trial_system_attr(ended._trial_id, "why", "pruned at rung 0")
        ended.report(0.25, step=20)
        study.tell(ended, state=optuna.trial.TrialState.PRUNED)
        assert study.trials[1].state == optuna.trial.TrialState.PRUNED  # reads in the block see the writes
        assert stored(0).user_attrs == {"result.r0": {"tasks": {"a": [1, 2]}}} and stored(1).intermediate_values == {}
    for number in (0, 1):
        database, memory = stored(number), study.trials[number]
        assert (database.user_attrs, database.system_attrs) == (memory.user_attrs, memory.system_attrs)
        assert (database.state, database.values) == (memory.state, memory.values)
        assert database.intermediate_values == memory.intermediate_values
        assert database.datetime_complete == memory.datetime_complete
    assert stored(0).user_attrs == {"result.r0": {"tasks": {"a": [3, 4]}}, "decision.r0": "promote"}
    assert stored(1).state == optuna.trial.TrialState.PRUNED and stored(1).intermediate_values == {20: 0.25}
    study.tell(promoted, 0.5)  # outside a block, writes go through call by call again
    assert stored(0).value == 0.5


def test_a_transaction_the_database_refuses_stops_the_storage_until_it_is_reloaded(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = SingleWriterStorage(optuna.storages.RDBStorage(url))
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    with sqlite3.connect(tmp_path / "study.db") as other:  # the database loses a table behind our back
        other.execute("DROP TABLE trial_values")
    with pytest.raises(StorageDiverged, match="did not take a transaction"), storage.in_one_transaction():
        trial.set_user_attr("decision.r0", "complete")
        study.tell(trial, 0.5)
    assert optuna.load_study(study_name="s", storage=url).trials[0].user_attrs == {}  # rolled back whole
    with pytest.raises(StorageDiverged):
        study.get_trials()  # the memory copy says complete, the database does not: no more answers from it
    reloaded = optuna.load_study(study_name="s", storage=SingleWriterStorage(optuna.storages.RDBStorage(url)))
    assert reloaded.trials[0].state == optuna.trial.TrialState.RUNNING
