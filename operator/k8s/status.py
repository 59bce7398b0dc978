"""The MergeSearch `.status`: what `kubectl get` and `kubectl describe` show. Bounded in size.

Whatever the number of trials, the status holds counters, per-rung tallies, the best trial, at most ten
members of the Pareto front and the held-out comparison (one row per baseline); trial history lives in
the study. Condition reasons are constants so that alerts and tests can match them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..search.controller import SearchStatus
from ..search.phases import Phase

READY = "Ready"
SPEC_ACCEPTED = "SpecAccepted"

REASON_RUNNING = "Searching"
REASON_SUSPENDED = "Suspended"
REASON_SUCCEEDED = "Succeeded"
REASON_FAILED = "SearchFailed"
REASON_INVALID = "InvalidSpec"
REASON_IMMUTABLE = "ImmutableFieldChanged"
REASON_ACCEPTED = "Accepted"
REASON_UNAVAILABLE = "DependencyUnavailable"
MAX_FINAL_ROWS = 24


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, ok: bool, reason: str, message: str, previous: list[dict[str, Any]] | None = None) -> dict:
    """A condition, keeping its lastTransitionTime while its status does not change."""
    before = next((c for c in previous or [] if c.get("type") == kind), None)
    status = "True" if ok else "False"
    since = before["lastTransitionTime"] if before and before.get("status") == status else _now()
    return {"type": kind, "status": status, "reason": reason, "message": message[:1000], "lastTransitionTime": since}


def with_condition(conditions: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in conditions if c.get("type") != new["type"]] + [new]


def search_status(status: SearchStatus, *, generation: int | None, conditions: list[dict[str, Any]]) -> dict[str, Any]:
    ready_reason = {
        Phase.SUCCEEDED: REASON_SUCCEEDED,
        Phase.FAILED: REASON_FAILED,
        Phase.SUSPENDED: REASON_SUSPENDED,
    }.get(status.phase, REASON_RUNNING)
    ready = condition(READY, status.phase is not Phase.FAILED, ready_reason, status.message, conditions)
    body: dict[str, Any] = {
        "phase": status.phase,
        "message": status.message,
        "observedGeneration": generation,
        "conditions": with_condition(conditions, ready),
        "trials": dict(status.trials),
        "rungs": [
            {"samples": budget, "results": done, "running": running}
            for budget, done, running in zip(status.budgets, status.rungs, status.running_per_rung, strict=True)
        ],
        "samplesUsed": status.samples_used,
        "deviceSeconds": round(status.device_seconds, 1),
        "best": None,
        "front": status.front,
        "hypervolume": status.hypervolume,
        "heldOut": dict(sorted(status.final.items())[:MAX_FINAL_ROWS]),
    }
    if status.best is not None:
        body["best"] = {
            "trial": status.best.trial,
            "value": round(status.best.value, 4),
            "objectives": {k: round(v, 4) for k, v in status.best.objectives.items()},
        }
    return body
