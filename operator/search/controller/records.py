"""The controller's one door to its Optuna study.

The Study API asks, tells, enqueues and reads; but it sets attributes and learning-curve points only on a
live `optuna.Trial`, and a controller must write them on trials an earlier controller asked (a restart
resumes them). Those two writes go to the study's storage by trial number. Everything the controller
writes or reads of its study goes through here, so the rest speaks in trial numbers and attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..storage import SingleWriterStorage


class StudyRecords:
    def __init__(self, study: optuna.Study, storage: SingleWriterStorage):
        self.study, self.storage = study, storage
        self._study_id = storage.get_study_id_from_name(study.study_name)
        self._trial_ids: dict[int, int] = {}

    def trials(self, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    @property
    def attrs(self) -> dict[str, Any]:
        """The study's own attributes (phase, message, the final stage's records, ...)."""
        return self.study.user_attrs

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    def enqueue(self, params: dict[str, Any]) -> None:
        self.study.enqueue_trial(params, skip_if_exists=True)

    def ask(self) -> optuna.Trial:
        return self.study.ask()

    def tell(self, trial: int | optuna.Trial, state: TrialState, values: float | list[float] | None = None) -> None:
        """End a trial; telling one already ended does nothing (a decision may be acted on twice)."""
        self.study.tell(trial, values, state=state, skip_if_finished=True)

    def best_trials(self, pareto: bool) -> list[FrozenTrial]:
        """The Pareto front, or the one best trial; none before a trial completes."""
        if not self.trials(states=(TrialState.COMPLETE,)):
            return []
        return list(self.study.best_trials) if pareto else [self.study.best_trial]

    def set_trial_attr(self, number: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self._trial_id(number), key, value)

    def report(self, number: int, step: int, value: float) -> None:
        """A learning-curve point: the dashboard draws it, and TPE ranks pruned trials by it."""
        self.storage.set_trial_intermediate_value(self._trial_id(number), step, value)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Writes in the block reach the database in one transaction (see `SingleWriterStorage`)."""
        with self.storage.in_one_transaction():
            yield

    def _trial_id(self, number: int) -> int:
        if number not in self._trial_ids:
            self._trial_ids[number] = self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)
        return self._trial_ids[number]
