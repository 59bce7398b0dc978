"""What the controller reads of a trial: its stored facts (attributes) through a `TrialView`.

Every fact a decision rests on is a trial attribute, written before it is acted on: the trial's bracket,
its plan (stored at launch), whether it is ready (its parameters complete), each rung's counts
(`result.r<k>`), decision (`decision.r<k>`) and failed runs (`failures.r<k>`), and why it was skipped,
stopped or interrupted. A view reads them, plus what the running reconcile has stored since.
"""

from __future__ import annotations

import functools
from collections import ChainMap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from ..hyperband import Schedule
from ..phases import Decision

BRACKET = "bracket"
READY = "ready"
PLAN = "plan"
SKIPPED = "skipped"
STOPPED = "stopped"
INTERRUPTED = "interrupted"
WEIGHTS = "weights"


def result_key(rung: int) -> str:
    return f"result.r{rung}"


def decision_key(rung: int) -> str:
    return f"decision.r{rung}"


def failures_key(rung: int) -> str:
    return f"failures.r{rung}"


@dataclass
class Asked:
    """What this reconcile knows of a trial it has just asked for (instead of reading it back)."""

    number: int
    state: TrialState
    user_attrs: dict[str, Any]


@dataclass
class TrialView:
    """A trial's stored facts, read from its attributes (plus what this reconcile has stored since)."""

    trial: FrozenTrial | Asked
    schedule: Schedule
    stored: dict[str, Any] = field(default_factory=dict)
    told: TrialState | None = None  # what this reconcile told Optuna, not yet in `trial`
    scores: dict[tuple[int, tuple[float, ...] | None], float] = field(default_factory=dict)  # see `_score`

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def state(self) -> TrialState:
        return self.told or self.trial.state

    @property
    def attrs(self) -> Mapping[str, Any]:
        return ChainMap(self.stored, self.trial.user_attrs)

    @functools.cached_property
    def bracket(self) -> int:  # set when the trial is asked, never changed
        return int(self.attrs.get(BRACKET, 0))

    def result(self, rung: int) -> dict[str, Any] | None:
        return self.attrs.get(result_key(rung))

    def decision(self, rung: int) -> Decision | None:
        stored = self.attrs.get(decision_key(rung))
        return None if stored is None else Decision(stored)

    def failures(self, rung: int) -> list[dict[str, Any]]:
        return list(self.attrs.get(failures_key(rung), []))

    @property
    def rung(self) -> int:
        """The rung in flight (or the last one, once decided)."""
        rung = self.bracket
        while self.decision(rung) == Decision.PROMOTE and rung < self.schedule.top_rung:
            rung += 1
        return rung

    def counts(self, up_to: int) -> dict[str, tuple[int, int]]:
        """(correct, evaluated) per task over every rung up to `up_to`."""
        total: dict[str, tuple[int, int]] = {}
        for rung in range(self.bracket, up_to + 1):
            result = self.result(rung)
            if result is None:
                continue
            for task, (correct, evaluated) in result["tasks"].items():
                c, e = total.get(task, (0, 0))
                total[task] = (c + correct, e + evaluated)
        return total

    def samples_used(self) -> int:
        return sum(
            e for rung in range(self.schedule.rungs) for _, e in (self.result(rung) or {"tasks": {}})["tasks"].values()
        )

    def seconds(self) -> float:
        total = 0.0
        for rung in range(self.schedule.rungs):
            result = self.result(rung)
            total += result["seconds"] if result else 0.0
            total += sum(f.get("seconds", 0.0) for f in self.failures(rung))
        return total


def skips_in_a_row(views: list[TrialView]) -> tuple[int, str]:
    """How many of the latest asked candidates were skipped, and the last one's reason."""
    count, reason = 0, ""
    for view in reversed(views):
        if view.state == TrialState.WAITING:
            continue
        if not view.attrs.get(SKIPPED):
            break
        count, reason = count + 1, reason or view.attrs[SKIPPED]
    return count, reason


def accuracies(counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    return {task: (c / e if e else 0.0) for task, (c, e) in counts.items()}


def usage(views: Iterable[TrialView], accelerators_per_run: float) -> tuple[int, float]:
    """(samples evaluated, accelerator-seconds held) by these trials' runs, failed ones included."""
    samples = seconds = 0
    for view in views:
        samples += view.samples_used()
        seconds += view.seconds()
    return samples, seconds * accelerators_per_run
