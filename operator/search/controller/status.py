"""What a search looks like now (`SearchStatus`), computed from its trials' views; small whatever the
number of trials. The CLI prints it, the operator writes it to the resource's status and the metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState

from ..hyperband import Schedule
from ..objectives import hypervolume, pareto_front, weighted_score
from ..phases import Phase
from .trials import SKIPPED, TrialView, accuracies, usage

FRONT_SIZE_IN_STATUS = 10


@dataclass(frozen=True)
class Best:
    """The best trial so far by the weighted score (in pareto mode too), with its search-split accuracies."""

    trial: int
    value: float
    objectives: dict[str, float]


@dataclass
class SearchStatus:
    """What the search looks like now; small whatever the number of trials."""

    phase: Phase
    message: str = ""
    trials: dict[str, int] = field(default_factory=dict)  # running, completed, pruned, failed, skipped
    rungs: list[int] = field(default_factory=list)  # rung results recorded, per rung
    running_per_rung: list[int] = field(default_factory=list)
    samples_used: int = 0
    device_seconds: float = 0.0
    best: Best | None = None
    front: list[dict[str, Any]] = field(default_factory=list)  # top of the Pareto front
    hypervolume: float | None = None
    final: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> objective -> test accuracy
    budgets: list[int] = field(default_factory=list)


def summarize(
    views: Sequence[TrialView],
    phase: Phase,
    message: str,
    *,
    schedule: Schedule,
    objectives: Mapping[str, float],
    pareto: bool,
    accelerators_per_run: float,
    final: Mapping[str, dict[str, Any]],
) -> SearchStatus:
    """The status of trials seen through `views`; `objectives` maps each objective to its weight, `final`
    holds the final stage's records by label."""
    counts = {"running": 0, "completed": 0, "pruned": 0, "failed": 0, "skipped": 0}
    rungs = [0] * schedule.rungs
    running_per_rung = [0] * schedule.rungs
    for view in views:
        state = view.state
        if view.attrs.get(SKIPPED):
            counts["skipped"] += 1
        elif state == TrialState.RUNNING:
            counts["running"] += 1
            running_per_rung[view.rung] += 1
        elif state == TrialState.COMPLETE:
            counts["completed"] += 1
        elif state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif state == TrialState.FAIL:
            counts["failed"] += 1
        for rung in range(schedule.rungs):
            rungs[rung] += view.result(rung) is not None
    samples, device_seconds = usage(views, accelerators_per_run)
    status = SearchStatus(
        phase=phase,
        message=message,
        trials=counts,
        rungs=rungs,
        running_per_rung=running_per_rung,
        samples_used=samples,
        device_seconds=device_seconds,
        budgets=list(schedule.budgets),
    )
    completed = [v for v in views if v.state == TrialState.COMPLETE]
    names = list(objectives)
    if completed:
        points = []
        for view in completed:
            acc = accuracies(view.counts(schedule.top_rung))
            points.append([acc.get(name, 0.0) for name in names])
        if pareto:
            front = pareto_front(points)
            status.front = [
                {"trial": completed[i].number, "objectives": dict(zip(names, points[i], strict=True))}
                for i in sorted(front, key=lambda i: -sum(points[i]))[:FRONT_SIZE_IN_STATUS]
            ]
            status.hypervolume = hypervolume([points[i] for i in front], [0.0] * len(names))
        scores = [weighted_score(dict(zip(names, p, strict=True)), objectives) for p in points]
        best = max(range(len(completed)), key=lambda i: scores[i])
        status.best = Best(completed[best].number, scores[best], dict(zip(names, points[best], strict=True)))
    for label, record in final.items():
        if "tasks" in record:
            status.final[label] = {t: (c / e if e else 0.0) for t, (c, e) in record["tasks"].items()}
    return status
