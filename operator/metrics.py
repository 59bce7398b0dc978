"""Prometheus metrics of the operator: searches' progress from their status, runs and reconciles as they happen.

Names follow Prometheus conventions (base units, `_total` for counters, `_seconds` for durations);
every search series carries `namespace` and `search`. The Grafana dashboard in the chart queries exactly
these names, and a test runs each of its queries against a real Prometheus that scraped the operator.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from .search.controller import SearchObserver, SearchStatus
from .search.phases import Phase

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
_SEARCH = ["namespace", "search"]
STATES = ("running", "completed", "pruned", "failed", "skipped")

TRIALS = Gauge("mergesearch_trials", "Trials of a search, by state", [*_SEARCH, "state"], registry=REGISTRY)
RUNNING = Gauge(
    "mergesearch_running_trials", "Trials with a run in flight, by rung", [*_SEARCH, "rung"], registry=REGISTRY
)
RUNG_RESULTS = Gauge(
    "mergesearch_rung_results", "Rung results recorded so far, by rung", [*_SEARCH, "rung"], registry=REGISTRY
)
BEST = Gauge("mergesearch_best_value", "Weighted mean accuracy of the best trial", _SEARCH, registry=REGISTRY)
BEST_OBJECTIVE = Gauge(
    "mergesearch_best_objective_accuracy",
    "Accuracy of the best trial per objective",
    [*_SEARCH, "objective"],
    registry=REGISTRY,
)
HYPERVOLUME = Gauge("mergesearch_pareto_hypervolume", "Hypervolume of the Pareto front", _SEARCH, registry=REGISTRY)
SAMPLES = Gauge("mergesearch_samples_evaluated", "Samples evaluated so far, all objectives", _SEARCH, registry=REGISTRY)
DEVICE_SECONDS = Gauge(
    "mergesearch_device_seconds", "Accelerator-seconds used by trial runs", _SEARCH, registry=REGISTRY
)
PHASE = Gauge("mergesearch_search_phase", "1 for the search's current phase", [*_SEARCH, "phase"], registry=REGISTRY)
RUN_DURATION = Histogram(
    "mergesearch_trial_run_duration_seconds",
    "Wall time of finished trial runs (rung 'final': the held-out evaluation)",
    [*_SEARCH, "rung"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
    registry=REGISTRY,
)
FAILURES = Counter(
    "mergesearch_trial_run_failures_total", "Failed trial runs, by cause", [*_SEARCH, "cause"], registry=REGISTRY
)
RECONCILE_DURATION = Histogram(
    "mergesearch_reconcile_duration_seconds",
    "Time to reconcile a search once",
    _SEARCH,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "mergesearch_reconcile_errors_total", "Reconciles that raised an error", _SEARCH, registry=REGISTRY
)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)


class SearchMetrics(SearchObserver):
    """One search's series: updated from its status after each reconcile, and by controller events."""

    def __init__(self, namespace: str, search: str):
        self.base = (namespace, search)
        self._series: set[tuple[object, tuple[str, ...]]] = set()

    def _child(self, metric, *extra: str):  # type: ignore[no-untyped-def]
        labels = (*self.base, *extra)
        self._series.add((metric, labels))
        return metric.labels(*labels)

    def run_finished(self, *, rung: int | None, seconds: float) -> None:
        self._child(RUN_DURATION, "final" if rung is None else str(rung)).observe(seconds)

    def run_failed(self, *, cause: str) -> None:
        self._child(FAILURES, cause).inc()

    def reconciled(self, seconds: float, *, error: bool) -> None:
        self._child(RECONCILE_DURATION).observe(seconds)
        errors = self._child(RECONCILE_ERRORS)
        if error:
            errors.inc()

    def update(self, status: SearchStatus) -> None:
        for state in STATES:
            self._child(TRIALS, state).set(status.trials.get(state, 0))
        for rung, (done, running) in enumerate(zip(status.rungs, status.running_per_rung, strict=True)):
            self._child(RUNG_RESULTS, str(rung)).set(done)
            self._child(RUNNING, str(rung)).set(running)
        if status.best is not None:
            self._child(BEST).set(status.best.value)
            for objective, value in status.best.objectives.items():
                self._child(BEST_OBJECTIVE, objective).set(value)
        if status.hypervolume is not None:
            self._child(HYPERVOLUME).set(status.hypervolume)
        self._child(SAMPLES).set(status.samples_used)
        self._child(DEVICE_SECONDS).set(status.device_seconds)
        self.phase(status.phase)

    def phase(self, current: str) -> None:
        for phase in Phase:
            self._child(PHASE, phase).set(1 if phase == current else 0)

    def forget(self) -> None:
        """Drop this search's series (it was deleted)."""
        for metric, labels in self._series:
            metric.remove(*labels)  # type: ignore[attr-defined]
        self._series.clear()
