"""An Optuna storage for the one process that writes a study: reads from memory, writes through to the database.

Optuna's RDB storage reads every unfinished trial back from the database on each `ask()` (to look for
enqueued trials) and on each `get_trials()`, through its ORM: with 64 trials in flight that is
thousands of rows per reconcile, and most of an operator's CPU. Yet a search's study has exactly one
writer, its controller (trial pods never write, and one operator replica runs each search). So this
storage loads a study once, keeps an `InMemoryStorage` copy, answers every read from it, and performs
every write on the database first (durable, and the database's checks apply) and then on the copy.

Written call by call, a new trial costs one transaction per parameter and attribute (about 20 for an
LFS candidate), and a finished run three or four (its counts, its learning-curve point, the decision,
the trial's end). Inside `in_one_transaction()`, writes reach the memory copy at once (so reads in the
block see them, and the copy's checks apply) and the database together when the block ends, in one
transaction of a few statements per trial: new trials whole (`_insert_trial`), then each changed
trial's changed rows, as the memory copy holds them then (`_update_trial`), with SQLAlchemy Core on
Optuna's own tables. The controller runs each reconcile in such a block (new trials, results,
decisions) and only then starts or deletes runs: nothing outside the process ever acts on a fact the
database does not hold.
If that transaction fails, the memory copy is ahead of the database: the storage then refuses every
further call (`StorageDiverged`), and its owner builds a new one, which loads the study afresh.

Contract, beyond `BaseStorage`'s: one process writes a given study; others may read it (the dashboard,
`mergesearch status`) through an ordinary storage. Ids handed out are the in-memory copy's; they are
stable for the life of this object. Thread-safe (one lock). It passes Optuna's own storage test suite.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import threading
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Connection, Table, delete, func, insert, select, update
from sqlalchemy.orm import Session


class StorageDiverged(RuntimeError):
    """A transaction of `in_one_transaction()` failed: the memory copy holds writes the database does not."""


@dataclass
class _Changes:
    """What a block changed on one stored trial; the values are read from the memory copy at the end."""

    user_attrs: set[str] = field(default_factory=set)
    system_attrs: set[str] = field(default_factory=set)
    steps: set[int] = field(default_factory=set)
    state: bool = False


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
        self._pending: dict[int, int] = {}  # new trials: memory trial id -> memory study id, in creation order
        self._changed: dict[int, _Changes] = {}  # stored trials changed in the block, by memory trial id
        self._diverged: StorageDiverged | None = None

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        """The lock, for a storage whose memory copy still agrees with the database."""
        with self._lock:
            if self._diverged is not None:
                raise self._diverged
            yield

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
        with self._open():
            db_study_id = self._db.create_new_study(directions, study_name)
            return self._load(db_study_id)

    def delete_study(self, study_id: int) -> None:
        with self._open():
            db_study_id = self._db_study_id(study_id)
            self._db.delete_study(db_study_id)
            self._memory.delete_study(study_id)
            del self._db_study[study_id], self._memory_study[db_study_id]

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        with self._open():
            self._db.set_study_user_attr(self._db_study_id(study_id), key, value)
            self._memory.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        with self._open():
            self._db.set_study_system_attr(self._db_study_id(study_id), key, value)
            self._memory.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        with self._open():
            return self._load(self._db.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        with self._open():
            return self._memory.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        with self._open():
            return self._memory.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        with self._open():
            return self._memory.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        with self._open():
            return self._memory.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        with self._open():
            for study in self._db.get_all_studies():
                self._load(study._study_id)
            return self._memory.get_all_studies()

    # -- trials ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def in_one_transaction(self) -> Iterator[None]:
        """Writes in this block reach the database in one transaction when it ends (also on an exception,
        so that the database keeps up with the memory copy); blocks do not nest."""
        with self._open():
            if self._deferring:
                raise RuntimeError("in_one_transaction() blocks do not nest")
            self._deferring = True
            try:
                yield
            finally:
                self._deferring = False
                self._write_deferred()

    def _write_deferred(self) -> None:
        pending, changed = list(self._pending.items()), dict(self._changed)
        self._pending, self._changed = {}, {}
        try:
            if isinstance(self._db, RDBStorage):
                with Session(self._db.engine) as session, session.begin():
                    for trial_id, study_id in pending:
                        self._db_trial[trial_id] = _insert_trial(
                            session, self._db_study_id(study_id), self._memory.get_trial(trial_id)
                        )
                    for trial_id, changes in changed.items():
                        _update_trial(session, self._db_trial[trial_id], self._memory.get_trial(trial_id), changes)
            else:  # Optuna's public way, call by call (the tests' in-memory backend)
                for trial_id, study_id in pending:
                    self._db_trial[trial_id] = _create_trial_through(
                        self._db, self._db_study_id(study_id), self._memory.get_trial(trial_id)
                    )
                for trial_id, changes in changed.items():
                    _update_trial_through(self._db, self._db_trial[trial_id], self._memory.get_trial(trial_id), changes)
        except Exception as error:
            self._diverged = StorageDiverged(f"the study's database did not take a transaction ({error}); reload it")
            for trial_id, _ in pending:
                self._db_trial.pop(trial_id, None)
            raise self._diverged from error

    def _deferred(self, trial_id: int) -> _Changes | None:
        """Where to note a change to a stored trial while deferring; None when writing through."""
        if not self._deferring:
            return None
        self._db_trial_id(trial_id)  # raises KeyError for an unknown trial, as Optuna's storages do
        return self._changed.setdefault(trial_id, _Changes())

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        with self._open():
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
        with self._open():
            if trial_id not in self._pending:  # a stored trial's parameters are set once, when it is asked
                self._db.set_trial_param(self._db_trial_id(trial_id), param_name, param_value_internal, distribution)
            self._memory.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        with self._open():
            return self._memory.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        with self._open():
            if trial_id in self._pending:
                return self._memory.set_trial_state_values(trial_id, state, values)
            if (changes := self._deferred(trial_id)) is not None:
                if self._memory.set_trial_state_values(trial_id, state, values):
                    changes.state = True
                    return True
                return False
            if not self._db.set_trial_state_values(self._db_trial_id(trial_id), state, values):
                return False
            return self._memory.set_trial_state_values(trial_id, state, values)

    def _write_row(
        self,
        trial_id: int,
        to_database: Callable[[int], None],
        to_memory: Callable[[], None],
        note: Callable[[_Changes], None],
    ) -> None:
        """One row of a trial: a new trial's go to memory only (it is inserted whole at the block's end);
        in a block, to memory and noted for the block's transaction; otherwise to the database first."""
        if trial_id in self._pending:
            to_memory()
        elif (changes := self._deferred(trial_id)) is not None:
            to_memory()
            note(changes)
        else:
            to_database(self._db_trial_id(trial_id))
            to_memory()

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        with self._open():
            self._write_row(
                trial_id,
                lambda db_trial_id: self._db.set_trial_intermediate_value(db_trial_id, step, intermediate_value),
                lambda: self._memory.set_trial_intermediate_value(trial_id, step, intermediate_value),
                lambda changes: changes.steps.add(step),
            )

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._open():
            self._write_row(
                trial_id,
                lambda db_trial_id: self._db.set_trial_user_attr(db_trial_id, key, value),
                lambda: self._memory.set_trial_user_attr(trial_id, key, value),
                lambda changes: changes.user_attrs.add(key),
            )

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._open():
            self._write_row(
                trial_id,
                lambda db_trial_id: self._db.set_trial_system_attr(db_trial_id, key, value),
                lambda: self._memory.set_trial_system_attr(trial_id, key, value),
                lambda changes: changes.system_attrs.add(key),
            )

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._open():
            return self._memory.get_trial(trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        with self._open():
            trials = self._memory.get_all_trials(study_id, deepcopy=False, states=states)
            return copy.deepcopy(trials) if deepcopy else trials


def _numbering_error(number: int) -> RuntimeError:
    return RuntimeError(f"trial {number} has another number in the database: another process writes this study")


# Optuna's tables, written with SQLAlchemy Core: the ORM's unit of work and its synchronising deletes
# were most of the operator's CPU per trial. The row layouts are Optuna's `_rdb.models`.
_TRIALS = models.TrialModel.__table__
_PARAMS = models.TrialParamModel.__table__
_USER_ATTRS = models.TrialUserAttributeModel.__table__
_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__table__
_VALUES = models.TrialValueModel.__table__
_INTERMEDIATE = models.TrialIntermediateValueModel.__table__


def _utc(moment: datetime.datetime | None) -> datetime.datetime | None:
    """A trial datetime as Optuna's RDB schema stores it: naive UTC (`TrialModel.datetime_start`'s setter)."""
    return None if moment is None else moment.astimezone(datetime.UTC).replace(tzinfo=None)


def _insert_trial(session: Session, study_id: int, trial: FrozenTrial) -> int:
    """Insert a whole trial with a few statements. Optuna's template path issues two queries per
    parameter and attribute; the in-memory copy has already checked everything those queries check."""
    connection = session.connection()
    trial_id = connection.scalar(
        insert(_TRIALS)
        .values(
            study_id=study_id,
            state=trial.state,
            datetime_start=_utc(trial.datetime_start),
            datetime_complete=_utc(trial.datetime_complete),
        )
        .returning(_TRIALS.c.trial_id)
    )
    number = connection.scalar(
        select(func.count(_TRIALS.c.trial_id)).where(_TRIALS.c.study_id == study_id, _TRIALS.c.trial_id < trial_id)
    )
    if number != trial.number:
        raise _numbering_error(trial.number)  # rolls the transaction back
    connection.execute(update(_TRIALS).where(_TRIALS.c.trial_id == trial_id).values(number=number))
    params = [
        {
            "trial_id": trial_id,
            "param_name": name,
            "param_value": trial.distributions[name].to_internal_repr(value),
            "distribution_json": distribution_to_json(trial.distributions[name]),
        }
        for name, value in trial.params.items()
    ]
    _insert_rows(connection, _PARAMS, params)
    _write_attributes(connection, _USER_ATTRS, trial_id, trial.user_attrs, replace=False)
    _write_attributes(connection, _SYSTEM_ATTRS, trial_id, trial.system_attrs, replace=False)
    _write_values(connection, trial_id, trial, replace=False)
    _write_intermediate(connection, trial_id, trial.intermediate_values, replace=False)
    return trial_id


def _update_trial(session: Session, trial_id: int, trial: FrozenTrial, changes: _Changes) -> None:
    """Write a stored trial's changed rows as `trial` (the memory copy) holds them now."""
    connection = session.connection()
    user_attrs = {key: trial.user_attrs[key] for key in changes.user_attrs}
    _write_attributes(connection, _USER_ATTRS, trial_id, user_attrs, replace=True)
    system_attrs = {key: trial.system_attrs[key] for key in changes.system_attrs}
    _write_attributes(connection, _SYSTEM_ATTRS, trial_id, system_attrs, replace=True)
    steps = {step: trial.intermediate_values[step] for step in changes.steps}
    _write_intermediate(connection, trial_id, steps, replace=True)
    if changes.state:
        connection.execute(
            update(_TRIALS)
            .where(_TRIALS.c.trial_id == trial_id)
            .values(
                state=trial.state,
                datetime_start=_utc(trial.datetime_start),
                datetime_complete=_utc(trial.datetime_complete),
            )
        )
        _write_values(connection, trial_id, trial, replace=True)


def _insert_rows(connection: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    if rows:
        connection.execute(insert(table), rows)


def _write_attributes(
    connection: Connection, table: Table, trial_id: int, attrs: Mapping[str, Any], *, replace: bool
) -> None:
    if replace and attrs:
        connection.execute(delete(table).where(table.c.trial_id == trial_id, table.c.key.in_(attrs)))
    rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    _insert_rows(connection, table, rows)


def _write_values(connection: Connection, trial_id: int, trial: FrozenTrial, *, replace: bool) -> None:
    if replace:
        connection.execute(delete(_VALUES).where(_VALUES.c.trial_id == trial_id))
    rows = []
    for objective, value in enumerate(trial.values or []):
        stored, kind = models.TrialValueModel.value_to_stored_repr(value)
        rows.append({"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind})
    _insert_rows(connection, _VALUES, rows)


def _write_intermediate(connection: Connection, trial_id: int, steps: Mapping[int, float], *, replace: bool) -> None:
    if replace and steps:
        connection.execute(
            delete(_INTERMEDIATE).where(_INTERMEDIATE.c.trial_id == trial_id, _INTERMEDIATE.c.step.in_(steps))
        )
    rows = []
    for step, value in steps.items():
        stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
        rows.append({"trial_id": trial_id, "step": step, "intermediate_value": stored, "intermediate_value_type": kind})
    _insert_rows(connection, _INTERMEDIATE, rows)


def _create_trial_through(db: BaseStorage, study_id: int, trial: FrozenTrial) -> int:
    db_trial_id = db.create_new_trial(study_id, template_trial=trial)
    if db.get_trial_number_from_id(db_trial_id) != trial.number:
        raise _numbering_error(trial.number)
    return db_trial_id


def _update_trial_through(db: BaseStorage, db_trial_id: int, trial: FrozenTrial, changes: _Changes) -> None:
    for key in changes.user_attrs:
        db.set_trial_user_attr(db_trial_id, key, trial.user_attrs[key])
    for key in changes.system_attrs:
        db.set_trial_system_attr(db_trial_id, key, trial.system_attrs[key])
    for step in changes.steps:
        db.set_trial_intermediate_value(db_trial_id, step, trial.intermediate_values[step])
    if changes.state:
        db.set_trial_state_values(db_trial_id, trial.state, trial.values)
