"""The Grafana dashboard's PromQL, extracted so tests can run it against a real Prometheus.

Every query the dashboard runs is a panel target's `expr`, or a template variable's `label_values(...)`.
`dashboard_queries()` returns the former with the template variables substituted as Grafana would with
one value chosen (regex matchers take the value as a regex, so the defaults `.*` mean "All");
`variable_queries()` turns the latter into PromQL that returns the same label values.

End-to-end use (a Prometheus that scraped the operator, tests/support/prometheus.py)::

    for query in dashboard_queries(namespace="default", search="demo", rate_interval="30s"):
        prometheus.wait_for_series(query.expr, timeout=60)

`METRICS` is the operator's metrics contract (names, types, labels) the dashboard was written against.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "mergesearch" / "dashboards" / "mergesearch.json"

_SEARCH = ("namespace", "search")
# name -> (type, labels). Counters are named with their `_total` suffix, as Prometheus sees them.
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mergesearch_trials": ("gauge", (*_SEARCH, "state")),
    "mergesearch_running_trials": ("gauge", (*_SEARCH, "rung")),
    "mergesearch_rung_results": ("gauge", (*_SEARCH, "rung")),
    "mergesearch_best_value": ("gauge", _SEARCH),
    "mergesearch_best_objective_accuracy": ("gauge", (*_SEARCH, "objective")),
    "mergesearch_pareto_hypervolume": ("gauge", _SEARCH),
    "mergesearch_samples_evaluated": ("gauge", _SEARCH),
    "mergesearch_device_seconds": ("gauge", _SEARCH),
    "mergesearch_search_phase": ("gauge", (*_SEARCH, "phase")),
    "mergesearch_trial_run_duration_seconds": ("histogram", (*_SEARCH, "rung")),
    "mergesearch_trial_run_failures_total": ("counter", (*_SEARCH, "cause")),
    "mergesearch_reconcile_duration_seconds": ("histogram", _SEARCH),
    "mergesearch_reconcile_errors_total": ("counter", _SEARCH),
}
# prometheus-client's default process collector (Linux), which the dashboard's operator row reads.
PROCESS_METRICS = ("process_cpu_seconds_total", "process_resident_memory_bytes")
TRIAL_STATES = ("running", "completed", "pruned", "failed", "skipped")
FAILURE_CAUSES = ("OOMKilled", "DeadlineExceeded", "ImagePull", "Unschedulable", "UserError", "Lost", "Other")
VARIABLES = ("datasource", "job", "namespace", "search")
_METRIC_NAME = re.compile(r"\b((?:mergesearch|process)_[a-zA-Z0-9_]+)\b")
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|count|sum)$")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")


@dataclass(frozen=True)
class DashboardQuery:
    panel: str
    ref_id: str
    expr: str

    def __str__(self) -> str:
        return f"{self.panel} [{self.ref_id}]: {self.expr}"


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def substitute(expr: str, *, namespace: str, search: str, job: str, rate_interval: str) -> str:
    """`expr` with Grafana's variables replaced; raises ValueError if one is left that this does not know."""
    values = {"__rate_interval": rate_interval, "namespace": namespace, "search": search, "job": job}
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value)
        expr = re.sub(r"\$" + re.escape(name) + r"\b", lambda _match, value=value: value, expr)
    if "$" in expr or "[[" in expr:
        raise ValueError(f"unknown template variable left in {expr!r}")
    return expr


def dashboard_queries(
    *,
    namespace: str = ".*",
    search: str = ".*",
    job: str = "mergesearch",
    rate_interval: str = "1m",
    path: Path = DASHBOARD,
) -> list[DashboardQuery]:
    """Every panel target's PromQL with the variables substituted (`job`: the operator's scrape job)."""
    queries = []
    for panel in panels(load_dashboard(path)):
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], namespace=namespace, search=search, job=job, rate_interval=rate_interval)
            queries.append(DashboardQuery(panel["title"], target["refId"], expr))
    return queries


def variable_queries(*, namespace: str = ".*", path: Path = DASHBOARD) -> list[DashboardQuery]:
    """The query variables' `label_values(selector, label)` as PromQL returning one series per value."""
    queries = []
    for variable in load_dashboard(path)["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(definition)
        if match is None:
            raise ValueError(f"variable {variable['name']}: expected label_values(selector, label), not {definition!r}")
        selector = substitute(match["selector"], namespace=namespace, search=".*", job="", rate_interval="")
        queries.append(
            DashboardQuery(f"variable {variable['name']}", "var", f"group by ({match['label']}) ({selector})")
        )
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric families an expression reads (histogram series mapped back to their family)."""
    names = set()
    for name in _METRIC_NAME.findall(expr):
        family = _HISTOGRAM_SUFFIX.sub("", name)
        names.add(family if family in METRICS and METRICS[family][0] == "histogram" else name)
    return names
