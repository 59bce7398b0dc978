"""The operator at scale: 1,000 trials, 64 in parallel, with instant fake pods, against the API emulator.

What it costs the cluster and the operator per trial, with the trial work taken out: the Kubernetes API
requests the operator makes (kopf's and ours, counted by the emulator by user agent), the operator's
CPU seconds (from /proc, for the whole run), and the size of the MergeSearch status at the end. The
study lives in a real PostgreSQL. The "kubelet" here runs nothing: it marks each new pod Succeeded
with a synthetic result in its termination message (a formula of the plan, as in tests/search).

    python -m bench.operator_scale [--trials 1000] [--parallel 64] [--sampler tpe|random]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from mergesearch_operator.k8s.pods import spec_of
from mergesearch_trial_runner.testbed.models import TinyLlama, random_llama
from tests.search.synthetic import SyntheticExecutor
from tests.support.kube import MERGESEARCH, KubeServer
from tests.support.postgres import PostgresServer

NAMESPACE = "scale"
KUBELET_AGENT = "bench-kubelet"


class InstantKubelet(threading.Thread):
    """Marks every new pod Succeeded at once, with the synthetic executor's result as termination message."""

    def __init__(self, kubeconfig: Path):
        super().__init__(daemon=True)
        client = kubernetes.config.new_client_from_config(str(kubeconfig))
        client.user_agent = KUBELET_AGENT
        self.core = kubernetes.client.CoreV1Api(client)
        self.synthetic = SyntheticExecutor()
        self.seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                response = self.core.list_namespaced_pod(
                    NAMESPACE, watch="true", timeout_seconds=5, _preload_content=False
                )
                for line in response.stream():
                    for part in line.splitlines():
                        if part.strip():
                            self.handle(json.loads(part))
            except Exception:
                time.sleep(0.1)

    def handle(self, event: dict[str, Any]) -> None:
        pod = event["object"]
        name = pod["metadata"]["name"]
        if event["type"] != "ADDED" or name in self.seen or (pod.get("status") or {}).get("phase"):
            return
        self.seen.add(name)
        spec = spec_of(pod)
        self.synthetic.start(spec)
        self.synthetic.runs[spec.name]["polls_left"] = 0
        result = self.synthetic.poll(spec.name).result
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        container = pod["spec"]["containers"][0]
        self.core.patch_namespaced_pod(
            name,
            NAMESPACE,
            {
                "status": {
                    "phase": "Succeeded",
                    "containerStatuses": [
                        {
                            "name": container["name"],
                            "image": container["image"],
                            "imageID": "",
                            "restartCount": 0,
                            "ready": False,
                            "state": {
                                "terminated": {
                                    "exitCode": 0,
                                    "reason": "Completed",
                                    "message": result.compact_json(),
                                    "startedAt": now,
                                    "finishedAt": now,
                                }
                            },
                        }
                    ],
                }
            },
        )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=64)
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--results", help="default: bench/results/operator_scale_<sampler>_<trials>.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ms-scale-"))
    shape = TinyLlama(hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    models = {
        name: random_llama(work / name, seed=i, shape=shape) for i, name in enumerate(("base", "reverse", "sort"))
    }
    tasks = {}
    for task in ("reverse", "sort"):
        tasks[task] = work / f"{task}.jsonl"
        tasks[task].write_text("".join(json.dumps({"prompt": str(i), "answer": "x"}) + "\n" for i in range(1200)))

    postgres = PostgresServer().start()
    kube = KubeServer().start()
    kubeconfig = kube.kubeconfig(work / "kubeconfig", NAMESPACE)
    core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(kubeconfig)))
    core.create_namespaced_secret(
        NAMESPACE, {"metadata": {"name": "mergesearch-db"}, "stringData": {"url": postgres.create_database("scale")}}
    )
    core.create_namespaced_secret(
        NAMESPACE,
        {
            "metadata": {"name": "mergesearch-s3"},
            "stringData": {"AWS_ACCESS_KEY_ID": "unused", "AWS_SECRET_ACCESS_KEY": "unused"},
        },
    )
    kubelet = InstantKubelet(kubeconfig)
    kubelet.start()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MERGESEARCH_RECONCILE_SECONDS": "1"}
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mergesearch_operator.cli",
            "operator",
            "--namespace",
            NAMESPACE,
            "--metrics-port",
            "0",
            "--health-port",
            "0",
        ],
        env=env,
        stdout=(work / "operator.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    time.sleep(8)  # imports and the initial listing
    cpu_before = cpu_seconds(operator.pid)
    requests_before = len(kube.requests)
    manifest = {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": "scale", "namespace": NAMESPACE},
        "spec": {
            "models": {
                "base": str(models["base"]),
                "experts": [{"name": e, "uri": str(models[e])} for e in ("reverse", "sort")],
            },
            "searchSpace": {"type": "LFS", "layerGroups": 2, "methods": ["linear", "task_arithmetic", "ties"]},
            "objectives": [{"name": t, "data": str(p)} for t, p in tasks.items()],
            "fidelity": {"minSamples": 10, "maxSamples": 90, "reductionFactor": 3},
            "budget": {"maxTrials": args.trials, "parallelTrials": args.parallel, "maxFailedTrials": 10},
            "search": {"sampler": args.sampler},
            "trial": {"backend": "hf", "timeoutSeconds": 600},
        },
    }
    (work / "search.yaml").write_text(yaml.safe_dump(manifest))
    started = time.monotonic()
    subprocess.run(
        ["kubectl", "apply", "--validate=false", "-f", str(work / "search.yaml")],
        env=env,
        check=True,
        capture_output=True,
    )
    status: dict[str, Any] = {}
    while time.monotonic() - started < args.timeout:
        time.sleep(2)
        status = (kube.object(MERGESEARCH, NAMESPACE, "scale") or {}).get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed"):
            break
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(operator.pid) - cpu_before
    operator_requests = [
        r
        for r in kube.requests[requests_before:]
        if not str(r.headers.get("User-Agent", "")).startswith((KUBELET_AGENT, "kubectl"))
    ]
    by_kind: dict[str, int] = {}
    for r in operator_requests:
        key = f"{r.method} {r.resource.plural if r.resource else r.url.path}"
        by_kind[key] = by_kind.get(key, 0) + 1
    trials = sum(status.get("trials", {}).values())
    result = {
        "trials": trials,
        "parallel": args.parallel,
        "sampler": args.sampler,
        "phase": status.get("phase"),  # not Succeeded: --timeout cut the run, the counts are those so far
        "seconds": round(elapsed, 1),
        "pods": len(kubelet.seen),
        "api_requests": len(operator_requests),
        "api_requests_per_trial": round(len(operator_requests) / max(trials, 1), 2),
        "api_requests_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "operator_cpu_seconds": round(cpu, 2),
        "operator_cpu_ms_per_trial": round(1000 * cpu / max(trials, 1), 2),
        "status_bytes": len(json.dumps(status)),
    }
    results = Path(args.results or f"bench/results/operator_scale_{args.sampler}_{args.trials}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    operator.terminate()
    try:
        operator.wait(30)
    except subprocess.TimeoutExpired:  # a reconcile thread still in flight; the numbers are already taken
        operator.kill()
    kubelet.stop.set()
    kube.stop()
    postgres.stop()


if __name__ == "__main__":
    main()
