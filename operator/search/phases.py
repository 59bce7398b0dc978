"""The words a search's state is told in: its phase, and a rung's decision on a trial.

One home for both, read by the controller, the CLI, the operator's status and events, the metrics and
the report. Both are string enums, so they compare equal to (and are stored as) their values, as the
study and the resource status hold them.
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    FINALIZING = "Finalizing"  # the held-out evaluation of the best merge and the baselines
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INVALID = "Invalid"  # the operator's alone: a spec it refuses, so no search runs

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class Decision(StrEnum):
    """What a rung's result leads to for its trial."""

    PROMOTE = "promote"  # on to the next rung
    PRUNE = "prune"  # not in the top 1/eta of its bracket at this rung
    COMPLETE = "complete"  # the top rung: the trial's value is told to Optuna
    STOP = "stop"  # a sample or device-time budget ran out
