"""A real Prometheus server for tests: the Debian package's `prometheus` binary on a free loopback port.

It scrapes the given `host:port` targets every second (`honor_labels: true`, as the chart's ServiceMonitor
does, so the `namespace` label the operator puts on a search's series survives), keeps its data in a fresh
temporary directory, and is stopped by its PID. Queries go to its HTTP API without any proxy.

Usage::

    with prometheus_server(["127.0.0.1:9090"], job="mergesearch") as prometheus:
        prometheus.wait_for_series('up{job="mergesearch"} == 1')
        prometheus.query("mergesearch_trials")      # the instant vector's samples

With `rules` (a rules file's content: `{"groups": [...]}`) it also evaluates them every second;
`alerts()` lists the alerts they raise.

Install the binary with `apt-get install -y --no-install-recommends prometheus` (as root).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HOST = "127.0.0.1"
SCRAPE_INTERVAL = "1s"
_STARTUP_SECONDS = 30.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusQueryError(RuntimeError):
    """Prometheus refused a query (bad PromQL, a timeout); the message holds its `errorType` and `error`."""


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError(
            "no `prometheus` binary: install it with `apt-get install -y --no-install-recommends prometheus` (root)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass
class PrometheusServer:
    """One running Prometheus; `url` is its HTTP API's base."""

    process: subprocess.Popen[bytes]
    port: int
    root: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with _NO_PROXY.open(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422/503 carry a JSON body saying what is wrong
            try:
                body = json.loads(exc.read())
            except ValueError:
                raise PrometheusQueryError(f"{path} {params}: HTTP {exc.code}") from None
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{params.get('query', path)!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate `expr` now (instant query); returns the samples as `[{"metric": {...}, "value": [t, "v"]}]`
        (a scalar result becomes one sample with no labels). Raises `PrometheusQueryError` for bad PromQL."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def wait_for_series(self, expr: str, timeout: float = 30.0, *, finite: bool = False) -> list[dict[str, Any]]:
        """Poll `expr` until it returns at least one sample (with `finite`, one whose value is a finite number:
        `histogram_quantile` over a window without observations returns NaN), and return the samples.

        Raises `TimeoutError` naming the expression, the last result and every target's scrape health;
        `PrometheusQueryError` at once for PromQL that Prometheus rejects."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while True:
            result = self.query(expr)
            if finite:
                result = [s for s in result if math.isfinite(float(s["value"][1]))]
            if result:
                return result
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.targets()]
        raise TimeoutError(
            f"no {'finite ' if finite else ''}sample of {expr!r} after {timeout:.0f} s; targets: {health}"
        )

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts of the loaded rules, pending or firing, each with `labels`, `state` and `annotations`."""
        return list(self._get("/api/v1/alerts")["alerts"])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error (for diagnosing an empty query)."""
        return list(self._get("/api/v1/targets")["activeTargets"])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM by PID, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def scrape_config(targets: Sequence[str], *, job: str, rule_files: Sequence[str] = ()) -> dict[str, Any]:
    """The prometheus.yml for scraping `targets` (`host:port`, path /metrics) every second as job `job`, and
    evaluating the rules in `rule_files` every second."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": list(rule_files),
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "metrics_path": "/metrics",
                "honor_labels": True,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }


def _wait_ready(server: PrometheusServer, deadline: float) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"prometheus exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            with _NO_PROXY.open(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError as exc:  # refused while starting; 503 while replaying its (empty) WAL
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"prometheus not ready after {_STARTUP_SECONDS:.0f} s ({last}):\n{server.log()[-3000:]}")


def start_prometheus(
    targets: Sequence[str], *, job: str = "mergesearch", rules: dict[str, Any] | None = None, attempts: int = 3
) -> PrometheusServer:
    """Start Prometheus scraping `targets` (and evaluating `rules`); returns once its API answers (the first
    scrape follows within 1 s)."""
    binary = prometheus_binary()
    last_error: Exception | None = None
    for _ in range(attempts):
        root = Path(tempfile.mkdtemp(prefix="mergesearch-prometheus-"))
        config = root / "prometheus.yml"
        rule_files = []
        if rules is not None:
            (root / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
            rule_files.append(str(root / "rules.yml"))
        config.write_text(yaml.safe_dump(scrape_config(targets, job=job, rule_files=rule_files), sort_keys=False))
        port = _free_port()
        log_path = root / "prometheus.log"
        args = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address={HOST}:{port}",
            f"--web.console.templates={root}",
            f"--web.console.libraries={root}",
            "--log.level=warn",
        ]
        with log_path.open("ab") as log:
            process = subprocess.Popen(args, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = PrometheusServer(process, port, root, log_path)
        try:
            _wait_ready(server, time.monotonic() + _STARTUP_SECONDS)
            return server
        except RuntimeError as exc:  # most likely the port was taken between the probe and the bind
            last_error = exc
            server.close()
    raise RuntimeError(f"could not start prometheus in {attempts} attempts: {last_error}")


@contextlib.contextmanager
def prometheus_server(
    targets: Sequence[str], *, job: str = "mergesearch", rules: dict[str, Any] | None = None
) -> Iterator[PrometheusServer]:
    """A Prometheus scraping `targets` (and evaluating `rules`) for the duration of the block; stopped by PID
    afterwards."""
    server = start_prometheus(targets, job=job, rules=rules)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def serve_changing_metrics(registry: Any, tick: Callable[[], None], *, every: float) -> Iterator[str]:
    """Serve `registry` on a free loopback port as the operator serves its metrics, calling `tick` every
    `every` seconds (observations keep arriving while Prometheus scrapes, as while searches run); yields
    `host:port`."""
    from prometheus_client import start_http_server

    stop = threading.Event()

    def advance() -> None:
        while not stop.is_set():
            tick()
            stop.wait(every)

    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    ticker = threading.Thread(target=advance, daemon=True)
    ticker.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        stop.set()
        ticker.join(timeout=5)
        server.shutdown()
        server.server_close()
