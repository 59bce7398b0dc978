"""Where trial runs execute: the interface between the search controller and processes or pods.

A run is named deterministically (`<search>-t<trial>-r<rung>`, `-a<n>` for a retry) and the controller
drives it only through that name, so after a restart it finds its runs again and never starts one twice.

Contract for every executor:
- `start(spec)` is idempotent: when a run of that name exists (running or finished) it does nothing.
- `poll(name)` never blocks for long and never raises for a missing run (it answers MISSING).
- `cancel(name)` and `release(name)` are idempotent; `release` tells the executor the controller has
  recorded a finished run (it may delete it, keeping the most recent failures for debugging).
- `held()` names every run the executor holds (running, or finished and not yet released), so that
  `sweep(live)` can let go of those the controller no longer wants, whatever was lost on the way.
- None of them is thread-safe; one controller drives one executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mergesearch_trial_runner.spec import ErrorKind, TrialResult, TrialSpec

# Why runs fail, as counted in metrics and status; the executor picks one for every failure.
CAUSES = ("OOMKilled", "DeadlineExceeded", "ImagePull", "Unschedulable", "UserError", "Lost", "Error")


class RunPhase(StrEnum):
    MISSING = "Missing"
    RUNNING = "Running"  # includes waiting to be scheduled
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class RunStatus:
    phase: RunPhase
    result: TrialResult | None = None  # what the runner reported (SUCCEEDED, or FAILED when it could report)
    failure: ErrorKind | None = None  # FAILED: retry (infrastructure) or record (user)
    cause: str = ""  # FAILED: one of CAUSES
    reason: str = ""  # FAILED: what happened, for people (the runner's message, the pod's state)
    seconds: float = 0.0  # how long the run held its device(s)

    def to_json(self) -> dict[str, Any]:
        """The status as JSON data (a worker pod answers the operator with it)."""
        return {
            "phase": self.phase.value,
            "result": None if self.result is None else self.result.model_dump(mode="json"),
            "failure": self.failure,
            "cause": self.cause,
            "reason": self.reason,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunStatus:
        result = data.get("result")
        return cls(
            phase=RunPhase(data["phase"]),
            result=None if result is None else TrialResult.model_validate(result),
            failure=data.get("failure"),
            cause=data.get("cause", ""),
            reason=data.get("reason", ""),
            seconds=float(data.get("seconds", 0.0)),
        )


class Executor(ABC):
    accelerators_per_run: float = 1.0  # for device-second budgets

    @abstractmethod
    def start(self, spec: TrialSpec) -> None: ...

    @abstractmethod
    def poll(self, name: str) -> RunStatus: ...

    @abstractmethod
    def cancel(self, name: str) -> None: ...

    @abstractmethod
    def release(self, name: str) -> None: ...

    @abstractmethod
    def held(self) -> Collection[str]:
        """Every run this executor holds: running, or finished and not yet released."""

    def sweep(self, live: Collection[str]) -> None:
        """Cancel or release every held run not in `live` (the runs the controller's study says are live)."""
        for name in [n for n in self.held() if n not in live]:
            if self.poll(name).phase is RunPhase.RUNNING:
                self.cancel(name)
            else:
                self.release(name)

    def close(self) -> None:  # noqa: B027 - an optional hook: pod executors keep nothing to let go
        """Let go of what the executor keeps between runs (a local fork server); started runs go on."""
