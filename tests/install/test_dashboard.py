"""The Grafana dashboard: well formed, written against the operator's metrics, and its PromQL answered by a real
Prometheus that scraped those metrics (served here by prometheus-client with made-up values)."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mergesearch_operator import metrics
from tests.install.dashboard import (
    FAILURE_CAUSES,
    METRICS,
    PROCESS_METRICS,
    TRIAL_STATES,
    VARIABLES,
    DashboardQuery,
    dashboard_queries,
    load_dashboard,
    metric_names,
    panels,
    variable_queries,
)
from tests.support.prometheus import serve_changing_metrics

_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
_SCRAPE_LABELS = {"job", "instance"}


def test_dashboard_is_well_formed():
    """Unique panel ids, panels inside the 24-column grid, every query panel on the `datasource` variable,
    the template variables the queries use, a stable uid (the sidecar and links key on it)."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == "mergesearch" and dashboard["title"] == "MergeSearch"
    all_panels = list(panels(dashboard))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == list(VARIABLES)


def test_queries_read_only_the_operators_metrics_and_labels():
    """Each query reads metrics of the contract (a typo would show an empty panel forever) and groups or
    filters by labels those metrics have; search panels filter by $namespace and $search, operator panels by
    $job (process metrics carry no search labels)."""
    problems = []
    raw = [(p["title"], t["expr"]) for p in panels(load_dashboard()) for t in p.get("targets", [])]
    for title, expr in raw:
        names = metric_names(expr)
        unknown = names - set(METRICS) - set(PROCESS_METRICS)
        if unknown:
            problems.append(f"{title}: unknown metrics {sorted(unknown)}")
            continue
        labels = set(_SCRAPE_LABELS)
        for name in names:
            labels |= set(METRICS.get(name, ("", ()))[1])
            if METRICS.get(name, ("",))[0] == "histogram":
                labels.add("le")
        used = {label.strip() for group in _BY.findall(expr) for label in group.split(",") if label.strip()}
        used |= set(_MATCHER.findall(expr))
        if used - labels:
            problems.append(f"{title}: labels {sorted(used - labels)} not on {sorted(names)}")
        if names <= set(PROCESS_METRICS) or "reconcile" in expr:
            if 'job="$job"' not in expr:
                problems.append(f"{title}: operator panel not filtered by job")
        elif 'namespace=~"$namespace"' not in expr or 'search=~"$search"' not in expr:
            problems.append(f"{title}: search panel not filtered by namespace and search")
    assert not problems, "\n".join(problems)


def test_dashboard_shows_every_operator_metric():
    """Every metric of the contract appears in some panel; the panels the brief asks for are there."""
    exprs = [q.expr for q in dashboard_queries()]
    used = set().union(*(metric_names(e) for e in exprs))
    assert set(METRICS) | set(PROCESS_METRICS) <= used, sorted(set(METRICS) | set(PROCESS_METRICS) - used)
    assert any("histogram_quantile" in e and "mergesearch_trial_run_duration_seconds_bucket" in e for e in exprs)
    assert any("rate(mergesearch_trial_run_failures_total" in e and "by (cause)" in e for e in exprs)
    assert any("histogram_quantile" in e and "mergesearch_reconcile_duration_seconds_bucket" in e for e in exprs)


def test_contract_is_what_the_operator_exports():
    """METRICS (what the dashboard was written against) matches mergesearch_operator.metrics: same names,
    types and labels."""
    from prometheus_client.metrics import MetricWrapperBase

    exported = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            exported[name] = (value._type, tuple(value._labelnames))
    assert exported == METRICS


def test_substitution_covers_every_variable():
    """No `$variable` is left in any query, and the variable queries are label_values() Grafana understands."""
    assert all("$" not in q.expr for q in dashboard_queries(namespace="team-a", search="demo", rate_interval="30s"))
    assert [q.panel for q in variable_queries()] == ["variable job", "variable namespace", "variable search"]


def test_every_query_is_valid_promql(tmp_path: Path):
    """promtool (from the same Debian package as Prometheus) parses each query as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: apt-get install -y --no-install-recommends prometheus")
    queries = dashboard_queries() + variable_queries()
    rules = [{"record": f"dashboard:query_{i}", "expr": q.expr} for i, q in enumerate(queries)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def fake_operator_metrics() -> Iterator[str]:
    """An HTTP endpoint with the contract's metrics (made-up values for two searches, changing while it runs
    so that rates and quantiles have data) and prometheus-client's process metrics; yields `host:port`."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    families = {}
    for name, (kind, labels) in METRICS.items():
        cls = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}[kind]
        families[name] = cls(name.removesuffix("_total"), f"fake {name}", labels, registry=registry)
    searches = [("team-a", "math-code"), ("team-b", "pareto")]
    for namespace, search in searches:
        for i, state in enumerate(TRIAL_STATES):
            families["mergesearch_trials"].labels(namespace, search, state).set(10 - i)
        for rung in ("0", "1", "2"):
            families["mergesearch_running_trials"].labels(namespace, search, rung).set(3 - int(rung))
            families["mergesearch_rung_results"].labels(namespace, search, rung).set(30 // (int(rung) + 1))
        families["mergesearch_best_value"].labels(namespace, search).set(0.61)
        for objective in ("gsm8k", "mmlu"):
            families["mergesearch_best_objective_accuracy"].labels(namespace, search, objective).set(0.5)
        families["mergesearch_pareto_hypervolume"].labels(namespace, search).set(0.3)
        families["mergesearch_search_phase"].labels(namespace, search, "Running").set(1)
        families["mergesearch_search_phase"].labels(namespace, search, "Succeeded").set(0)
    steps = itertools.count(1)

    def tick() -> None:
        step = next(steps)
        for namespace, search in searches:
            families["mergesearch_samples_evaluated"].labels(namespace, search).set(100 * step)
            families["mergesearch_device_seconds"].labels(namespace, search).set(7.5 * step)
            families["mergesearch_trial_run_duration_seconds"].labels(namespace, search, str(step % 3)).observe(
                40.0 * (1 + step % 5)
            )
            families["mergesearch_trial_run_failures_total"].labels(
                namespace, search, FAILURE_CAUSES[step % len(FAILURE_CAUSES)]
            ).inc()
            families["mergesearch_reconcile_duration_seconds"].labels(namespace, search).observe(0.02 * (step % 4))
            families["mergesearch_reconcile_errors_total"].labels(namespace, search).inc(step % 2)

    with serve_changing_metrics(registry, tick, every=0.1) as address:
        yield address


@pytest.mark.slow
def test_dashboard_queries_return_data_from_a_real_prometheus(fake_operator_metrics: str):
    """A real Prometheus scrapes the endpoint every second; every dashboard query and every variable query
    returns a finite sample (for one search, and for All), and a broken query is reported as such."""
    from tests.support.prometheus import PrometheusQueryError, prometheus_server

    with prometheus_server([fake_operator_metrics], job="mergesearch") as prometheus:
        prometheus.wait_for_series('up{job="mergesearch"} == 1', timeout=30)
        queries: list[DashboardQuery] = [
            *dashboard_queries(rate_interval="5s"),
            *dashboard_queries(namespace="team-a", search="math-code", rate_interval="5s"),
            *variable_queries(),
        ]
        for query in queries:
            samples = prometheus.wait_for_series(query.expr, timeout=30, finite=True)
            assert samples, query
        one_search = prometheus.query('mergesearch_best_value{namespace="team-a", search="math-code"}')
        assert [s["metric"]["namespace"] for s in one_search] == ["team-a"]  # honor_labels keeps the operator's
        with pytest.raises(PrometheusQueryError, match="parse error"):
            prometheus.query("sum(rate(mergesearch_trials[5s])")
