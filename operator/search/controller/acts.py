"""Store, then act: what a reconcile does to runs waits until the facts it rests on are committed.

Writes inside `DeferredActs.transaction()` reach the database in one transaction; the runs it starts,
releases and cancels are acted on after that commits, so that nothing outside acts on a fact the
database does not hold (a run deleted before its failure is stored would be started again under the same
name after a crash). After an exception nothing is acted on: the next reconcile finds the stored facts
and acts then (starting a run is idempotent by name). Every act is tried even when one fails (then the
first error is raised); a release or cancel that failed is tried again after the next commit. A release
lost with the process that was to send it is the controller's sweep's to find (see `loop`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

from mergesearch_trial_runner.spec import TrialSpec

from ...executors.base import Executor
from .records import StudyRecords

log = logging.getLogger(__name__)


class DeferredActs:
    def __init__(self, records: StudyRecords, executor: Executor):
        self.records, self.executor = records, executor
        self._pending: list[tuple[Callable[[], None], bool]] | None = None  # (act, whether a cleanup)
        self._cleanups_to_retry: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        acts: list[tuple[Callable[[], None], bool]] = []
        self._pending = acts
        try:
            with self.records.transaction():
                yield
        finally:
            self._pending = None
        retries, self._cleanups_to_retry = self._cleanups_to_retry, []
        errors = []
        for act, cleanup in [*((retry, True) for retry in retries), *acts]:
            try:
                act()
            except Exception as error:  # every act is tried; the first error is raised below
                errors.append(error)
                if cleanup:
                    self._cleanups_to_retry.append(act)
        for error in errors[1:]:
            log.warning("acting on the stored facts also failed: %r", error)
        if errors:
            raise errors[0]

    def _defer(self, act: Callable[[], None], *, cleanup: bool) -> None:
        assert self._pending is not None, "runs are started, released and cancelled inside a transaction"
        self._pending.append((act, cleanup))

    def start(self, spec: TrialSpec) -> None:
        self._defer(functools.partial(self.executor.start, spec), cleanup=False)

    def release(self, name: str) -> None:
        self._defer(functools.partial(self.executor.release, name), cleanup=True)

    def cancel(self, name: str) -> None:
        self._defer(functools.partial(self.executor.cancel, name), cleanup=True)
