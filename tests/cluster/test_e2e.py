"""The operator end to end, for real, without a cluster.

`kubectl apply` a MergeSearch against the Kubernetes API emulator (kmock); the operator (`mergesearch
operator`, kopf) runs the search against PostgreSQL and an S3 server (SeaweedFS); a test-only kubelet
runs the trial pods as local processes (the real trial runner: real merges of the tiny models, real
evaluations). Then the same with faults: pods failing and hanging, and the operator killed mid-search.
A real Prometheus scrapes the operator throughout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import kubernetes
import pytest
import yaml

MERGESEARCH = "mergesearch.io/v1alpha1/mergesearches"
NAMESPACE = "mergesearch-e2e"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def manifest(
    name: str, *, max_trials: int, timeout: int = 300, parallel: int = 2, mode: str = "weighted"
) -> dict[str, Any]:
    experts = ["reverse", "sort", "shift"]
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "models": {
                "base": "s3://models/tiny/base",
                "experts": [{"name": e, "uri": f"s3://models/tiny/{e}"} for e in experts],
            },
            "searchSpace": {"type": "LFS", "layerGroups": 2, "methods": ["linear", "task_arithmetic", "ties"]},
            "objectives": [
                {
                    "name": task,
                    "data": f"s3://evals/tasks/{task}.search.jsonl",
                    "testData": f"s3://evals/tasks/{task}.test.jsonl",
                    "maxNewTokens": 8,
                }
                for task in ("reverse", "sort")
            ],
            "fidelity": {"minSamples": 20, "maxSamples": 60, "reductionFactor": 3},
            "budget": {"maxTrials": max_trials, "parallelTrials": parallel, "maxFailedTrials": 10},
            "search": {"objectiveMode": mode},
            "trial": {
                "image": "example.org/mergesearch-trial:test",
                "backend": "hf",
                "engineArgs": {"device": "cpu"},
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                "timeoutSeconds": timeout,
            },
            "storage": {"databaseSecretRef": {"name": "db"}, "s3SecretRef": {"name": "s3"}},
            "output": {"uri": f"s3://models/merged/{name}"},
        },
    }


def quick(name: str, *, max_trials: int, **spec: Any) -> dict[str, Any]:
    """A search whose trials are short: one rung (every trial at 20 samples), two at a time."""
    document = manifest(name, max_trials=max_trials)
    document["spec"]["fidelity"] = {"minSamples": 20, "maxSamples": 20}
    document["spec"]["search"]["multiFidelity"] = False
    for key, value in spec.items():
        document["spec"][key] = {**document["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return document


class Cluster:
    """The emulator, the secrets, the kubelet and an operator process, wired together."""

    def __init__(self, tmp: Path, kube, s3, postgres_url: str):
        from tests.support.kubelet import FakeKubelet

        self.tmp, self.kube, self.s3, self.database = tmp, kube, s3, postgres_url
        self.kubeconfig = kube.kubeconfig(tmp / "kubeconfig", NAMESPACE)
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        client = kubernetes.config.new_client_from_config(str(self.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(client)
        self.core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": "db"}, "stringData": {"url": postgres_url}})
        env = s3.env()
        self.core.create_namespaced_secret(
            NAMESPACE,
            {
                "metadata": {"name": "s3"},
                "stringData": {
                    "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                    "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
                    "AWS_ENDPOINT_URL": env["AWS_ENDPOINT_URL"],
                    "AWS_REGION": env.get("AWS_REGION", "us-east-1"),
                },
            },
        )
        self.fault: Callable[[str], str | None] = lambda name: None
        self.kubelet = FakeKubelet(
            client, NAMESPACE, tmp / "node", fault=lambda pod: self.fault(pod["metadata"]["name"])
        )
        self.kubelet.start()
        self.metrics_port = free_port()
        self.operator: subprocess.Popen[bytes] | None = None

    def start_operator(self) -> None:
        log = (self.tmp / "operator.log").open("ab")
        self.operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mergesearch_operator.cli",
                "operator",
                "--namespace",
                NAMESPACE,
                "--metrics-port",
                str(self.metrics_port),
                "--health-port",
                str(free_port()),
            ],
            env={
                **self.env,
                "MERGESEARCH_RECONCILE_SECONDS": "1",
                "MERGESEARCH_UNSCHEDULABLE_SECONDS": "5",
                "MERGESEARCH_WORKER_IDLE_SECONDS": "10",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill_operator(self) -> None:
        assert self.operator is not None
        self.operator.send_signal(signal.SIGKILL)
        self.operator.wait()

    def apply(self, document: dict[str, Any]) -> None:
        path = self.tmp / f"{document['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(document))
        result = subprocess.run(
            ["kubectl", "apply", "--validate=false", "-f", str(path)], env=self.env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        """`kubectl patch` the search's spec, as a user edits a running search."""
        result = subprocess.run(
            ["kubectl", "patch", "mergesearch", name, "--type", "merge", "-p", json.dumps({"spec": spec})],
            env=self.env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr

    def created_pods(self, search: str) -> list[dict[str, Any]]:
        """The bodies of the search's pods as the operator created them."""
        return [
            r.data
            for r in self.kube.requests
            if r.action == kmock.action.CREATE
            and r.resource is not None
            and r.resource.plural == "pods"
            and r.data["metadata"]["name"].startswith(f"{search}-")
        ]

    def search(self, name: str) -> dict[str, Any]:
        return self.kube.object(MERGESEARCH, NAMESPACE, name) or {}

    def wait_for(self, name: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.search(name).get("status") or {}
            if status.get("phase") in phases:
                return status
            assert self.operator is not None and self.operator.poll() is None, self.log()
            time.sleep(1)
        raise AssertionError(f"{name} did not reach {phases}: {self.search(name).get('status')}\n{self.log()[-4000:]}")

    def log(self) -> str:
        return (self.tmp / "operator.log").read_text(errors="replace")

    def pod_creations(self) -> list[str]:
        return [
            r.data["metadata"]["name"]
            for r in self.kube.requests
            if r.action == kmock.action.CREATE and r.resource is not None and r.resource.plural == "pods"
        ]

    def close(self) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGTERM)
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                self.operator.kill()
        self.kubelet.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, world, s3_server, postgres):
    from tests.support.kube import KubeServer

    if os.geteuid() != 0:  # said once, as a skip, rather than as every test's RuntimeError
        pytest.skip("needs root: the test kubelet runs each trial pod in its own mount namespace (unshare -m)")

    for bucket in ("models", "evals"):
        s3_server.create_bucket(bucket)
    for name in ("base", *world.experts):
        s3_server.upload_dir(world.model(name), "models", f"tiny/{name}")
    tasks = tmp_path_factory.mktemp("tasks")
    for task in world.experts:  # smaller splits keep the held-out evaluations short
        for split, count in (("search", 200), ("test", 60)):
            lines = world.split(task, split).read_text().splitlines(keepends=True)[:count]
            (tasks / f"{task}.{split}.jsonl").write_text("".join(lines))
    s3_server.upload_dir(tasks, "evals", "tasks")
    kube = KubeServer().start()
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), kube, s3_server, postgres.create_database("operator_e2e"))
    cluster.start_operator()
    yield cluster
    cluster.close()
    kube.stop()


@pytest.fixture(scope="module")
def prometheus(cluster):
    from tests.support.prometheus import start_prometheus

    server = start_prometheus([f"127.0.0.1:{cluster.metrics_port}"])
    yield server
    server.close()


def test_a_search_runs_to_completion_and_the_best_merge_lands_in_the_bucket(cluster, prometheus):
    cluster.apply(manifest("clean", max_trials=6))
    status = cluster.wait_for("clean", ("Succeeded", "Failed"), timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["trials"]["completed"] >= 1 and sum(status["trials"].values()) == 6
    assert status["best"]["value"] > 0 and {"best", "task_arithmetic", "ties"} <= set(status["heldOut"])
    assert status["observedGeneration"] == 1
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])
    keys = [o["Key"] for o in cluster.s3.client().list_objects_v2(Bucket="models", Prefix="merged/clean/")["Contents"]]
    assert {"merged/clean/config.json", "merged/clean/mergesearch_plan.json", "merged/clean/scores.json"} <= set(keys)
    report = cluster.s3.client().get_object(Bucket="models", Key="merged/clean/report.html")["Body"].read().decode()
    assert report.count("data:image/png;base64,") >= 3 and "Held-out test split" in report  # the operator's report
    assert any(k.endswith(".safetensors") for k in keys)
    pods = cluster.pod_creations()
    assert len(pods) == len(set(pods)), "a pod was created twice"
    listing = subprocess.run(
        ["kubectl", "get", "mergesearch", "clean", "-o", "yaml"], env=cluster.env, capture_output=True, text=True
    )
    assert "phase: Succeeded" in listing.stdout


def fault_of(name: str) -> str | None:
    """About 20% of first attempts fail (crash or OOM) and 5% hang (at least trial 4's first run); trial 2's
    first pod is never scheduled."""
    if "-final-" in name or "-a" in name.rsplit("-r", 1)[-1]:
        return None
    if "-t2-" in name:
        return "unschedulable"
    if "-t4-" in name:
        return "hang"
    draw = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") % 100
    if draw < 20:
        return "fail" if draw % 2 else "oom"
    return "hang" if draw < 25 else None


def reconciles(cluster: Cluster, search: str) -> tuple[float, float]:
    """(reconciles, of which failed) of one search so far, from the operator's metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=5).read().decode()
    found = {"mergesearch_reconcile_duration_seconds_count": 0.0, "mergesearch_reconcile_errors_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found and sample.labels.get("search") == search:
                found[sample.name] = sample.value
    return found["mergesearch_reconcile_duration_seconds_count"], found["mergesearch_reconcile_errors_total"]


def stall_after_outage(cluster: Cluster, search: str, back: float, timeout: float = 120) -> float:
    """Seconds from the database's return to the search's first reconcile that does not fail."""
    count, errors = reconciles(cluster, search)
    while time.monotonic() - back < timeout:
        now_count, now_errors = reconciles(cluster, search)
        if now_count - count > now_errors - errors:
            return time.monotonic() - back
        time.sleep(0.25)
    raise AssertionError(f"{search} did not reconcile within {timeout}s of the database's return")


def test_chaos_kills_and_a_database_outage_lose_nothing_and_leave_nothing(cluster, prometheus, postgres):
    """SIGKILLs of the operator at seeded points (one right as a promotion's pod is created, one in the
    final stage), a PostgreSQL outage mid-search, failing and hanging pods; then every invariant."""
    import optuna

    from mergesearch_operator.k8s.pods import LABEL_SEARCH

    name, rng = "chaos", random.Random(23)
    cluster.fault = fault_of
    document = manifest(name, max_trials=8, timeout=60, mode="pareto")
    # Full Hyperband: its second bracket starts trials at the top rung, which the rung check below covers
    # (under the default ASHA every trial starts at the lowest rung, and the search runs more pods).
    document["spec"]["fidelity"]["brackets"] = None
    cluster.apply(document)
    runs = lambda: [p for p in cluster.pod_creations() if p.startswith(f"{name}-t")]  # noqa: E731
    kills = sorted(rng.sample(range(2, 10), 2))
    outage = rng.choice([k for k in range(3, 10) if k not in kills])
    events = sorted([(k, "kill") for k in kills] + [(outage, "outage"), (0, "promotion")])
    deadline, stall = time.monotonic() + 600, None
    for at, what in events:
        while time.monotonic() < deadline and not (
            any("-r1" in p for p in runs()) if what == "promotion" else len(runs()) >= at
        ):
            time.sleep(0.2)
        if what == "outage":
            postgres.restart(down_seconds=5)
            stall = stall_after_outage(cluster, name, back=time.monotonic())
        else:
            cluster.kill_operator()
            time.sleep(rng.uniform(0.5, 2.0))
            cluster.start_operator()
    if cluster.wait_for(name, ("Finalizing", "Succeeded", "Failed"), timeout=900)["phase"] == "Finalizing":
        cluster.kill_operator()  # during the final stage
        cluster.start_operator()
    status = cluster.wait_for(name, ("Succeeded", "Failed"), timeout=900)
    print(
        f"chaos: kills after runs {kills}, at the first promotion and in the final stage; outage after run "
        f"{outage}; stall after the database came back {stall:.1f}s"
    )

    assert status["phase"] == "Succeeded", status
    assert stall is not None and stall < 15, f"the search stalled {stall:.1f}s after the database came back"
    study = optuna.load_study(study_name=f"{NAMESPACE}.{name}", storage=cluster.database)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))  # contiguous: nothing asked and lost
    assert sum(status["trials"].values()) == 8
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert status["trials"]["completed"] == len(completed)  # the status says what the study holds
    assert status["front"] and status["hypervolume"] > 0 and any(k.startswith("front-") for k in status["heldOut"])
    budgets = (20, 60)
    for trial in trials:
        rungs = [k for k in range(2) if f"result.r{k}" in trial.user_attrs]
        if rungs:
            bracket = trial.user_attrs.get("bracket", 0)
            evaluated = sum(trial.user_attrs[f"result.r{k}"]["tasks"]["reverse"][1] for k in rungs)
            assert evaluated == budgets[max(rungs)], f"trial {trial.number}: samples counted twice or lost"
            assert min(rungs) == bracket
    pods = [p for p in cluster.pod_creations() if p.startswith(name)]
    assert len(pods) == len(set(pods)), "a pod was created twice"
    faulted = [p for p in pods if fault_of(p)]
    assert faulted, "the draw injected no fault"
    for pod in faulted:
        assert f"{pod}-a1" in pods, f"{pod} ({fault_of(pod)}) was not retried under a new name"
    time.sleep(3)  # a last reconcile's sweep
    left = cluster.core.list_namespaced_pod(NAMESPACE, label_selector=f"{LABEL_SEARCH}={name}").items
    # Nothing is left but failed pods kept for debugging (the operator's keepFailedPods, 5)
    assert all(p.status.phase == "Failed" for p in left) and len(left) <= 5, [p.metadata.name for p in left]
    events = cluster.core.list_namespaced_event(NAMESPACE).items
    assert any(e.involved_object.name == name for e in events)


def worker_runs(cluster: Cluster, search: str) -> dict[Path, list[str]]:
    """Each worker pod's directory on the node -> the runs it started, in order (its executor's ledger)."""
    ledgers = sorted((cluster.tmp / "node" / "pods").glob(f"{search}-w*/*/scratch/worker/runs.log"))
    return {ledger.parents[2]: [line.split()[1] for line in ledger.read_text().splitlines()] for ledger in ledgers}


def busy_worker(cluster: Cluster, search: str) -> str | None:
    """A worker pod with a run in progress: its newest run has a pid record and no result yet."""
    for pod_dir, runs in worker_runs(cluster, search).items():
        run_dir = pod_dir / "scratch" / "worker" / "runs" / runs[-1]
        if (run_dir / "pid").exists() and not (run_dir / "result.json").exists():
            return pod_dir.parent.name
    return None


def test_reused_pods_run_trial_after_trial_through_a_lost_worker_and_a_restart(cluster):
    name = "reused"
    cluster.fault = lambda pod: None
    document = quick(name, max_trials=8, trial={"reusePods": True})
    cluster.apply(document)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and max(map(len, worker_runs(cluster, name).values()), default=0) < 2:
        time.sleep(0.5)
    cluster.kill_operator()  # a worker has taken its second run: the restarted operator must find the runs
    time.sleep(3)
    started_before = sum(map(len, worker_runs(cluster, name).values()))
    cluster.start_operator()
    # Once the restarted operator starts runs, it has asked every worker which runs it holds.
    lost = None
    while time.monotonic() < deadline and lost is None:
        if sum(map(len, worker_runs(cluster, name).values())) > started_before:
            lost = busy_worker(cluster, name)
        time.sleep(0.5)
    assert lost is not None, "no worker was ever seen busy"
    cluster.core.delete_namespaced_pod(lost, NAMESPACE)  # the node goes away under a running trial
    status = cluster.wait_for(name, ("Succeeded", "Failed"), timeout=600)
    assert status["phase"] == "Succeeded", status
    assert sum(status["trials"].values()) == 8 and {"best", "task_arithmetic", "ties"} <= set(status["heldOut"])
    listing = cluster.s3.client().list_objects_v2(Bucket="models", Prefix=f"merged/{name}/")
    assert f"merged/{name}/mergesearch_plan.json" in [o["Key"] for o in listing["Contents"]]

    runs = worker_runs(cluster, name)
    started = [run for ledger in runs.values() for run in ledger]
    assert len(started) == len(set(started)), f"a run was started twice: {runs}"
    assert any(run.endswith("-a1") for run in started), f"the lost worker's run was not retried: {runs}"
    # Workers idle for 10 s go (between the last trial and the final stage, say): at least 2 runs a worker.
    assert len(runs) <= len(started) // 2, f"{len(runs)} workers for {len(started)} runs: {runs}"
    assert not [p for p in cluster.pod_creations() if p.startswith(name) and not p.startswith(f"{name}-w")]
    assert cluster.core.read_namespaced_secret(f"{name}-worker-token", NAMESPACE).data["token"]
    deadline = time.monotonic() + 60  # idle workers go, so a finished search holds no devices
    while time.monotonic() < deadline and search_pods(cluster, name):
        time.sleep(1)
    assert not search_pods(cluster, name)


def search_pods(cluster: Cluster, search: str) -> list[str]:
    return [
        p.metadata.name for p in cluster.core.list_namespaced_pod(NAMESPACE).items if p.metadata.name.startswith(search)
    ]


def test_prometheus_scraped_every_metric(cluster, prometheus):
    for metric in (
        "mergesearch_trials",
        "mergesearch_running_trials",
        "mergesearch_rung_results",
        "mergesearch_best_value",
        "mergesearch_best_objective_accuracy",
        "mergesearch_samples_evaluated",
        "mergesearch_device_seconds",
        "mergesearch_search_phase",
        "mergesearch_trial_run_duration_seconds_count",
        "mergesearch_trial_run_failures_total",
        "mergesearch_reconcile_duration_seconds_count",
        "mergesearch_reconcile_errors_total",
    ):
        result = prometheus.wait_for_series(metric, timeout=30)
        assert result, metric
    assert prometheus.query('mergesearch_trials{search="clean",state="completed"}')


def test_every_dashboard_query_returns_data(cluster, prometheus):
    from tests.install.dashboard import dashboard_queries, variable_queries

    queries = dashboard_queries(namespace=NAMESPACE, rate_interval="30m") + variable_queries(namespace=NAMESPACE)
    assert len(queries) > 10
    for query in queries:
        assert prometheus.wait_for_series(query.expr, timeout=60), query


def test_a_bad_resource_gets_a_condition_and_an_event_and_others_go_on(cluster):
    bad = manifest("broken", max_trials=2)
    bad["spec"]["fidelity"] = {"minSamples": 500, "maxSamples": 60}
    cluster.apply(bad)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = cluster.search("broken").get("status") or {}
        if status.get("phase") == "Invalid":
            break
        time.sleep(1)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "minSamples (500) is above maxSamples (60)" in ready["message"]
    events = [e for e in cluster.core.list_namespaced_event(NAMESPACE).items if e.involved_object.name == "broken"]
    assert any(e.type == "Warning" and e.reason == "InvalidSpec" for e in events)
    assert cluster.operator is not None and cluster.operator.poll() is None  # no crash loop


TEMPLATE = {
    "imagePullSecrets": [{"name": "regcred"}],
    "priorityClassName": "batch-low",
    "env": [{"name": "EXTRA_SETTING", "value": "on"}],
    "volumes": [{"name": "extra", "emptyDir": {}}],
    "volumeMounts": [{"name": "extra", "mountPath": "/extra"}],
    "labels": {"team": "research"},
    "annotations": {"example.com/note": "from the template"},
}


def test_suspend_resume_and_a_raised_max_trials_through_the_operator(cluster):
    """A search created suspended starts no pod until resumed; once it has succeeded, raising maxTrials runs
    the extra trials and finishes again. Its pods carry the search's pod template."""
    name = "paused"
    cluster.fault = lambda pod: None
    cluster.apply(quick(name, max_trials=2, suspend=True, trial=TEMPLATE))
    status = cluster.wait_for(name, ("Suspended",), timeout=120)
    assert status["message"].startswith("suspended")
    time.sleep(5)  # several reconciles (every second here): still nothing started
    assert not cluster.created_pods(name) and cluster.search(name)["status"]["phase"] == "Suspended"

    cluster.patch(name, {"suspend": False})
    status = cluster.wait_for(name, ("Succeeded", "Failed"), timeout=600)
    assert status["phase"] == "Succeeded" and sum(status["trials"].values()) == 2, status
    pods = cluster.created_pods(name)
    assert pods
    for pod in pods:  # the template, applied by the real operator, beside its own parts
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        assert meta["labels"]["team"] == "research" and meta["labels"]["mergesearch.io/search"] == name
        assert meta["annotations"] == TEMPLATE["annotations"]
        assert spec["imagePullSecrets"] == [{"name": "regcred"}] and spec["priorityClassName"] == "batch-low"
        assert {"name": "extra", "emptyDir": {}} in spec["volumes"]
        assert {"name": "extra", "mountPath": "/extra"} in container["volumeMounts"]
        assert container["env"][-1] == {"name": "EXTRA_SETTING", "value": "on"}
        assert container["env"][0]["name"] == "MERGESEARCH_TRIAL_SPEC"

    cluster.patch(name, {"budget": {"maxTrials": 3}})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = cluster.search(name).get("status") or {}
        if sum(status.get("trials", {}).values()) == 3 and status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    assert status["phase"] == "Succeeded" and sum(status["trials"].values()) == 3, status
    assert status["observedGeneration"] == 3  # created, resumed, raised
    trial_pods = [p["metadata"]["name"] for p in cluster.created_pods(name) if "-final-" not in p["metadata"]["name"]]
    assert any("-t2-" in pod for pod in trial_pods), trial_pods


def test_max_gpu_seconds_stops_the_search_and_says_so(cluster):
    name = "gpu-budget"
    cluster.fault = lambda pod: None
    cluster.apply(quick(name, max_trials=50, budget={"maxGpuSeconds": 1}))
    status = cluster.wait_for(name, ("Succeeded", "Failed"), timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["message"].startswith("done: budget.maxGpuSeconds reached ("), status["message"]
    assert status["deviceSeconds"] >= 1
    # the runs in flight when the budget ran out finish; no new trial starts
    assert 1 <= sum(status["trials"].values()) <= 2, status
    events = [e for e in cluster.core.list_namespaced_event(NAMESPACE).items if e.involved_object.name == name]
    assert any(e.reason == "Succeeded" and "budget.maxGpuSeconds" in (e.message or "") for e in events)
