"""The chart's alert rules (a PrometheusRule, `alerts.enabled`): rendered from values, valid for promtool,
written against the operator's metrics, and raised by a real Prometheus for seeded conditions (and not for
healthy searches)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.install.dashboard import METRICS, metric_names
from tests.install.tree import of_kind, one, render_chart
from tests.support.prometheus import serve_changing_metrics

ALERTS = ("MergeSearchStuck", "MergeSearchTrialRunsFailing", "MergeSearchOperatorDown")
# Short durations so that a real Prometheus (scraping and evaluating every second) raises them in seconds.
FAST = {
    "alerts": {
        "enabled": True,
        "searchStuck": {"after": "8s"},
        "trialFailures": {"threshold": 3, "window": "10s"},
        "operatorDown": {"for": "2s"},
    }
}


def rules_of(chart: Path, values: dict[str, Any]) -> dict[str, Any]:
    """The rendered PrometheusRule's spec: a rules file's content, as Prometheus loads it."""
    return one(render_chart(chart, values), "PrometheusRule")["spec"]


def test_alert_rules_are_off_by_default_and_labelled_when_on(chart: Path):
    assert not of_kind(render_chart(chart), "PrometheusRule")
    rule = one(render_chart(chart, {"alerts": {"enabled": True, "labels": {"release": "kps"}}}), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["namespace"] == "mergesearch"
    assert rule["metadata"]["labels"]["release"] == "kps"
    (group,) = rule["spec"]["groups"]
    assert [r["alert"] for r in group["rules"]] == list(ALERTS)
    for alert in group["rules"]:
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_values_reach_the_expressions(chart: Path):
    (group,) = rules_of(chart, {"alerts": {"enabled": True, "job": "ms-prod", **FAST["alerts"]}})["groups"]
    stuck, failing, down = group["rules"]
    assert "offset 8s" in stuck["expr"] and "[8s]" in stuck["expr"]
    assert "[10s]" in failing["expr"] and failing["expr"].strip().endswith("> 3")
    assert down["for"] == "2s" and 'job="ms-prod"' in down["expr"]
    assert all('job="ms-prod"' in r["expr"] for r in group["rules"])


def test_rules_pass_promtool(chart: Path, tmp_path: Path):
    """`promtool check rules` (expressions parse; alert templates in annotations are valid) for the defaults and
    for short durations."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: apt-get install -y --no-install-recommends prometheus")
    for name, values in (("defaults", {"alerts": {"enabled": True}}), ("fast", FAST)):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(rules_of(chart, values)))
        result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS: 3 rules found" in result.stdout, result.stdout


def test_rules_read_only_the_operators_metrics(chart: Path):
    """A misspelt metric would make an alert that can never fire: every name is one the operator exports
    (the contract test_dashboard checks against operator/metrics.py), or `up`."""
    (group,) = rules_of(chart, {"alerts": {"enabled": True}})["groups"]
    for rule in group["rules"]:
        names = metric_names(rule["expr"]) | ({"up"} if "up{" in rule["expr"] else set())  # Prometheus' own
        assert names and names <= {*METRICS, "up"}, (rule["alert"], names - set(METRICS))
        assert "$labels" not in rule["expr"]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"alerts": {"searchStuck": {"after": "2 hours"}}}, "/alerts/searchStuck/after"),
        ({"alerts": {"trialFailures": {"threshold": "10"}}}, "/alerts/trialFailures/threshold"),
        ({"alerts": {"job": 'a"b'}}, "/alerts/job"),
        ({"alerts": {"operatordown": {}}}, "operatordown"),
    ],
)
def test_schema_rejects_bad_alert_values(chart: Path, values: dict[str, Any], where: str):
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError) as caught:
        render_chart(chart, values)
    assert where in str(caught.value)


@pytest.fixture
def searches() -> Iterator[str]:
    """The operator's metrics for three searches, changing while Prometheus scrapes them: `healthy` finishes
    runs all the time, `stuck` is Running and finishes none, `failing` finishes runs and fails more. Yields
    `host:port`."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    phase = Gauge("mergesearch_search_phase", "phase", ["namespace", "search", "phase"], registry=registry)
    runs = Histogram(
        "mergesearch_trial_run_duration_seconds", "runs", ["namespace", "search", "rung"], registry=registry
    )
    failures = Counter(
        "mergesearch_trial_run_failures", "failures", ["namespace", "search", "cause"], registry=registry
    )
    for search in ("healthy", "stuck", "failing"):
        phase.labels("team-a", search, "Running").set(1)
        phase.labels("team-a", search, "Succeeded").set(0)

    def tick() -> None:
        runs.labels("team-a", "healthy", "0").observe(30)
        runs.labels("team-a", "failing", "0").observe(30)
        failures.labels("team-a", "failing", "OOMKilled").inc()

    with serve_changing_metrics(registry, tick, every=0.5) as address:
        yield address


def firing(prometheus: Any, alert: str, timeout: float) -> list[dict[str, Any]]:
    """The firing instances of `alert`, waiting up to `timeout` seconds for one."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = [a for a in prometheus.alerts() if a["labels"]["alertname"] == alert and a["state"] == "firing"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once the probe is closed


@pytest.mark.slow
def test_a_real_prometheus_raises_the_alerts_for_seeded_conditions(chart: Path, searches: str):
    """The rendered rules loaded into a real Prometheus: the stuck search and the failing one alert, the
    healthy one does not, and the operator is up; with the operator's endpoint gone, OperatorDown fires."""
    from tests.support.prometheus import prometheus_server

    rules = rules_of(chart, FAST)
    with prometheus_server([searches], job="mergesearch", rules=rules) as prometheus:
        prometheus.wait_for_series('up{job="mergesearch"} == 1', timeout=30)
        stuck = firing(prometheus, "MergeSearchStuck", timeout=40)
        assert [a["labels"]["search"] for a in stuck] == ["stuck"], stuck
        assert stuck[0]["labels"]["namespace"] == "team-a" and stuck[0]["labels"]["severity"] == "warning"
        assert stuck[0]["annotations"]["summary"] == "MergeSearch team-a/stuck has finished no trial run for 8s"
        failing = firing(prometheus, "MergeSearchTrialRunsFailing", timeout=30)
        assert [a["labels"]["search"] for a in failing] == ["failing"], failing
        assert not firing(prometheus, "MergeSearchOperatorDown", timeout=0)
        for rule in rules["groups"][0]["rules"]:  # every expression evaluates (no error) on the live data
            prometheus.query(rule["expr"])

    with prometheus_server([closed_port()], job="mergesearch", rules=rules) as prometheus:
        prometheus.wait_for_series('up{job="mergesearch"} == 0', timeout=30)
        down = firing(prometheus, "MergeSearchOperatorDown", timeout=30)
        assert down and down[0]["labels"]["severity"] == "critical", prometheus.alerts()
