"""An Optuna storage for the one process that writes a study: reads from memory, writes through to the database.

Optuna's RDB storage reads every unfinished trial back from the database on each `ask()` (to look for
enqueued trials) and on each `get_trials()`, through its ORM: with 64 trials in flight that is
thousands of rows per reconcile, and most of an operator's CPU. Yet a search's study has exactly one
writer, its controller (trial pods never write, and one operator replica runs each search). So this
storage loads a study once, keeps an `InMemoryStorage` copy, answers every read from it, and performs
every write on the database first (durable, and the database's checks apply) and then on the copy.

A new trial costs one database write per parameter and attribute (about 20 for an LFS candidate), each
its own transaction. Inside `new_trials_in_one_write()`, trials created by `ask()` stay in memory while
they are filled in, and reach the database when the block ends, each as one transaction of a few
statements (`_insert_trial`). The controller asks, suggests and marks a candidate in such a block, and only
then starts its run: nothing outside the process ever sees a trial the database does not hold.

Contract, beyond `BaseStorage`'s: one process writes a given study; others may read it (the dashboard,
`mergesearch status`) through an ordinary storage. Ids handed out are the in-memory copy's; they are
stable for the life of this object. Thread-safe (one lock). It passes Optuna's own storage test suite.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections.abc import Container, Iterator, Sequence
from typing import Any

from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, select
from sqlalchemy.orm import Session


class SingleWriterStorage(BaseStorage):
    def __init__(self, backend: BaseStorage):
        """`backend`: the durable storage (an `RDBStorage` in production)."""
        self._db = backend
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self._memory = InMemoryStorage()
        self._db_study: dict[int, int] = {}  # memory study id -> database study id
        self._memory_study: dict[int, int] = {}  # database study id -> memory study id
        self._db_trial: dict[int, int] = {}  # memory trial id -> database trial id
        self._deferring = False
        self._pending: dict[int, int] = {}  # memory trial id -> memory study id, in creation order

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- loading ---------------------------------------------------------------------------------------

    def _load(self, db_study_id: int) -> int:
        """The memory id of a database study, copying it (attributes and trials) on first use."""
        if db_study_id in self._memory_study:
            return self._memory_study[db_study_id]
        study_id = self._memory.create_new_study(
            self._db.get_study_directions(db_study_id), self._db.get_study_name_from_id(db_study_id)
        )
        for key, value in self._db.get_study_user_attrs(db_study_id).items():
            self._memory.set_study_user_attr(study_id, key, value)
        for key, value in self._db.get_study_system_attrs(db_study_id).items():
            self._memory.set_study_system_attr(study_id, key, value)
        for trial in self._db.get_all_trials(db_study_id, deepcopy=False):
            self._db_trial[self._memory.create_new_trial(study_id, template_trial=trial)] = trial._trial_id
        self._db_study[study_id], self._memory_study[db_study_id] = db_study_id, study_id
        return study_id

    def _db_study_id(self, study_id: int) -> int:
        if study_id not in self._db_study:
            self._memory.get_study_name_from_id(study_id)  # raises KeyError as Optuna's storages do
        return self._db_study[study_id]

    def _db_trial_id(self, trial_id: int) -> int:
        if trial_id not in self._db_trial:
            self._memory.get_trial(trial_id)  # raises KeyError as Optuna's storages do
        return self._db_trial[trial_id]

    # -- studies ---------------------------------------------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        with self._lock:
            db_study_id = self._db.create_new_study(directions, study_name)
            return self._load(db_study_id)

    def delete_study(self, study_id: int) -> None:
        with self._lock:
            db_study_id = self._db_study_id(study_id)
            self._db.delete_study(db_study_id)
            self._memory.delete_study(study_id)
            del self._db_study[study_id], self._memory_study[db_study_id]

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        with self._lock:
            self._db.set_study_user_attr(self._db_study_id(study_id), key, value)
            self._memory.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        with self._lock:
            self._db.set_study_system_attr(self._db_study_id(study_id), key, value)
            self._memory.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        with self._lock:
            return self._load(self._db.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        with self._lock:
            return self._memory.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        with self._lock:
            return self._memory.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        with self._lock:
            return self._memory.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        with self._lock:
            return self._memory.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        with self._lock:
            for study in self._db.get_all_studies():
                self._load(study._study_id)
            return self._memory.get_all_studies()

    # -- trials ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def new_trials_in_one_write(self) -> Iterator[None]:
        """Trials `ask()`ed in this block reach the database when it ends (also on an exception), one
        transaction each, in the order they were created."""
        with self._lock:
            self._deferring = True
            try:
                yield
            finally:
                self._deferring = False
                self._write_pending()

    def _write_pending(self) -> None:
        for trial_id, study_id in list(self._pending.items()):
            trial = self._memory.get_trial(trial_id)
            if isinstance(self._db, RDBStorage):
                db_trial_id = _insert_trial(self._db, self._db_study_id(study_id), trial)
            else:  # Optuna's public way, one call per row inside (the tests' in-memory backend)
                db_trial_id = self._db.create_new_trial(self._db_study_id(study_id), template_trial=trial)
                if self._db.get_trial_number_from_id(db_trial_id) != trial.number:
                    raise _numbering_error(trial.number)
            self._db_trial[trial_id] = db_trial_id
            del self._pending[trial_id]

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        with self._lock:
            if self._deferring and template_trial is None:
                trial_id = self._memory.create_new_trial(study_id)
                self._pending[trial_id] = study_id
                return trial_id
            db_trial_id = self._db.create_new_trial(self._db_study_id(study_id), template_trial)
            # Copy what the database made (its number, timestamps), so both agree exactly.
            trial_id = self._memory.create_new_trial(study_id, template_trial=self._db.get_trial(db_trial_id))
            self._db_trial[trial_id] = db_trial_id
            return trial_id

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        with self._lock:
            if trial_id not in self._pending:
                self._db.set_trial_param(self._db_trial_id(trial_id), param_name, param_value_internal, distribution)
            self._memory.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        with self._lock:
            return self._memory.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        with self._lock:
            if trial_id not in self._pending and not self._db.set_trial_state_values(
                self._db_trial_id(trial_id), state, values
            ):
                return False
            return self._memory.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        with self._lock:
            if trial_id not in self._pending:
                self._db.set_trial_intermediate_value(self._db_trial_id(trial_id), step, intermediate_value)
            self._memory.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            if trial_id not in self._pending:
                self._db.set_trial_user_attr(self._db_trial_id(trial_id), key, value)
            self._memory.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            if trial_id not in self._pending:
                self._db.set_trial_system_attr(self._db_trial_id(trial_id), key, value)
            self._memory.set_trial_system_attr(trial_id, key, value)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            return self._memory.get_trial(trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        with self._lock:
            trials = self._memory.get_all_trials(study_id, deepcopy=False, states=states)
            return copy.deepcopy(trials) if deepcopy else trials


def _numbering_error(number: int) -> RuntimeError:
    return RuntimeError(f"trial {number} has another number in the database: another process writes this study")


def _insert_trial(db: RDBStorage, study_id: int, trial: FrozenTrial) -> int:
    """Insert a whole trial in one transaction of a few statements, with Optuna's own schema (its
    `_rdb.models`, hence the pinned Optuna minor version). Optuna's template path issues two queries per
    parameter and attribute; the in-memory copy has already checked everything those queries check."""
    with Session(db.engine) as session, session.begin():
        row = models.TrialModel(
            study_id=study_id,
            state=trial.state,
            datetime_start=trial.datetime_start,
            datetime_complete=trial.datetime_complete,
        )
        session.add(row)
        session.flush()  # assigns row.trial_id
        number = session.scalar(
            select(func.count(models.TrialModel.trial_id)).where(
                models.TrialModel.study_id == study_id, models.TrialModel.trial_id < row.trial_id
            )
        )
        if number != trial.number:
            raise _numbering_error(trial.number)  # rolls the transaction back
        row.number = number
        values = trial.values or []
        session.add_all(
            [
                *(
                    models.TrialParamModel(
                        trial_id=row.trial_id,
                        param_name=name,
                        param_value=trial.distributions[name].to_internal_repr(value),
                        distribution_json=distribution_to_json(trial.distributions[name]),
                    )
                    for name, value in trial.params.items()
                ),
                *(
                    models.TrialUserAttributeModel(trial_id=row.trial_id, key=key, value_json=json.dumps(value))
                    for key, value in trial.user_attrs.items()
                ),
                *(
                    models.TrialSystemAttributeModel(trial_id=row.trial_id, key=key, value_json=json.dumps(value))
                    for key, value in trial.system_attrs.items()
                ),
                *(_value_row(row.trial_id, objective, value) for objective, value in enumerate(values)),
                *(_intermediate_row(row.trial_id, step, value) for step, value in trial.intermediate_values.items()),
            ]
        )
        return row.trial_id


def _value_row(trial_id: int, objective: int, value: float) -> models.TrialValueModel:
    stored, kind = models.TrialValueModel.value_to_stored_repr(value)
    return models.TrialValueModel(trial_id=trial_id, objective=objective, value=stored, value_type=kind)


def _intermediate_row(trial_id: int, step: int, value: float) -> models.TrialIntermediateValueModel:
    stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
    return models.TrialIntermediateValueModel(
        trial_id=trial_id, step=step, intermediate_value=stored, intermediate_value_type=kind
    )
