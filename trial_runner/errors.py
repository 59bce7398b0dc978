"""The one error policy: whether running the same trial spec again could succeed.

A user error (a bad plan, checkpoint, task file or setting; a store error that is not retryable) fails
the trial for good; anything else is infrastructure (out of memory, a lost engine, the network) and the
controller retries the run. The trial CLI reports with it and the engine host tells its trials with it,
so a hosted trial fails as one with its own engine would.
"""

from __future__ import annotations

from pydantic import ValidationError

from .checkpoint import CheckpointError
from .plan.tensors import PlanError
from .spec import ErrorKind
from .store import StoreError
from .tasks import TaskDataError

USER_ERRORS = (PlanError, CheckpointError, TaskDataError, ValidationError, ValueError)


def classify(exc: BaseException) -> tuple[ErrorKind, str]:
    """(error kind, message for people)."""
    if isinstance(exc, StoreError):
        return ("infrastructure" if exc.retryable else "user"), str(exc)
    if isinstance(exc, USER_ERRORS):
        return "user", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "infrastructure", f"OutOfMemory: {exc}"
    return "infrastructure", f"{type(exc).__name__}: {exc}"
