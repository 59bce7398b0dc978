"""A test-only node agent: plays kubelet for pods created in the Kubernetes emulator.

It watches pods in one namespace and runs each pod's container command as a local process with the
pod's environment (Secret references and the pod's IP resolved), in private mount and PID namespaces
where the pod's volumes and its termination-message file are bind-mounted at the paths the pod spec
names, as a container runtime would; deleting the pod kills every process in it. Each pod gets its own
loopback address (127.0.10.x) as its IP, so pods that listen on one port do not collide. It writes the
phase, exit code and termination message back into the pod's status, and enforces
`activeDeadlineSeconds`. Needs root (namespaces).

Faults are injected by name: `fault(pod) -> None | "fail" | "hang" | "oom" | "unschedulable"`.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

Fault = Callable[[dict[str, Any]], str | None]
FAULT_COMMANDS = {
    "fail": ["sh", "-c", "echo crashed >&2; exit 1"],
    "hang": ["sleep", "100000"],
    "oom": ["sh", "-c", "exit 137"],
}
MOUNT_POINTS = ("/scratch", "/var/cache/mergesearch")
TERMINATION_LOG = Path("/dev/termination-log")
# Own mount and PID namespaces; the pod's processes die with its first one, as in a container.
UNSHARE = ["unshare", "-m", "-p", "--kill-child", "--mount-proc", "--propagation", "private"]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubelet:
    def __init__(self, client: kubernetes.client.ApiClient, namespace: str, root: Path, fault: Fault | None = None):
        if os.geteuid() != 0:
            raise RuntimeError("the fake kubelet needs root for mount namespaces (unshare -m)")
        self.core = kubernetes.client.CoreV1Api(client)
        self.namespace = namespace
        self.root = root
        self.fault = fault or (lambda pod: None)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.started: list[str] = []  # every pod it ran, in order
        self._seen: set[str] = set()
        self._pod_numbers = itertools.count()  # next() on a count is atomic: the pods' threads share it
        self._stop = threading.Event()
        self._created_mount_points: list[Path] = []
        self._thread = threading.Thread(target=self._watch, name="fake-kubelet", daemon=True)

    def start(self) -> FakeKubelet:
        for point in map(Path, MOUNT_POINTS):
            if not point.exists():
                point.mkdir(parents=True)
                self._created_mount_points.append(point)
        if not TERMINATION_LOG.exists():
            TERMINATION_LOG.touch()
            self._created_mount_points.append(TERMINATION_LOG)
        (self.root / "cache").mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for process in list(self.processes.values()):
            process.kill()
        for point in reversed(self._created_mount_points):
            if point.is_dir():
                shutil.rmtree(point, ignore_errors=True)
            else:
                point.unlink(missing_ok=True)

    def _events(self) -> Any:
        """Pod watch events as dicts. (kubernetes.watch sends `watch=True`, which kmock does not read as a
        watch; the query is spelt as the apiserver documents it.)"""
        response = self.core.list_namespaced_pod(
            self.namespace, watch="true", timeout_seconds=5, _preload_content=False
        )
        for line in response.stream():
            for part in line.splitlines():
                if part.strip():
                    yield json.loads(part)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                for event in self._events():
                    pod = event["object"]
                    name = pod["metadata"]["name"]
                    if event["type"] == "DELETED":
                        process = self.processes.get(name)
                        if process is not None:
                            process.kill()
                    elif pod["metadata"]["uid"] not in self._seen and not (pod.get("status") or {}).get("phase"):
                        self._seen.add(pod["metadata"]["uid"])  # a new pod may take a deleted one's name
                        threading.Thread(target=self._run, args=(pod,), daemon=True).start()
                    if self._stop.is_set():
                        break
            except Exception:  # the emulator closes watches now and then; watch again
                time.sleep(0.2)

    def _patch(self, name: str, status: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod(name, self.namespace, {"status": status})
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise

    def _env(self, container: dict[str, Any], pod_ip: str) -> dict[str, str]:
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp", "PYTHONUNBUFFERED": "1"}
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if field is not None:
                if field != "status.podIP":
                    raise KeyError(f"the fake kubelet resolves only fieldRef status.podIP, not {field}")
                env[var["name"]] = pod_ip
                continue
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            try:
                secret = self.core.read_namespaced_secret(ref["name"], self.namespace)
            except ApiException:
                if ref.get("optional"):
                    continue
                raise
            data = secret.data or {}
            if ref["key"] in data:
                env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif not ref.get("optional"):
                raise KeyError(f"secret {ref['name']} has no key {ref['key']}")
        return env

    @staticmethod
    def _container_status(container: dict[str, Any], ready: bool, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": container["name"],
            "image": container["image"],
            "imageID": "",
            "restartCount": 0,
            "ready": ready,
            "state": state,
        }

    def _run(self, pod: dict[str, Any]) -> None:
        try:
            self._run_pod(pod)
        except Exception:  # a broken kubelet must show, not hang the test silently
            import traceback

            (self.root / "kubelet-errors.log").open("a").write(traceback.format_exc())

    def _run_pod(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        fault = self.fault(pod)
        if fault == "unschedulable":
            self._patch(
                name,
                {
                    "phase": "Pending",
                    "conditions": [
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": "0/1 nodes are available: insufficient nvidia.com/gpu",
                        }
                    ],
                },
            )
            return
        container = pod["spec"]["containers"][0]
        pod_dir = self.root / "pods" / name / pod["metadata"]["uid"]  # volumes start empty, as emptyDirs do
        (pod_dir / "scratch").mkdir(parents=True, exist_ok=True)
        termination = pod_dir / "termination-log"
        termination.touch()
        command = FAULT_COMMANDS.get(fault or "", [*container.get("command", []), *container.get("args", [])])
        mounts = (
            f"mount --bind {pod_dir / 'scratch'} /scratch && "
            f"mount --bind {self.root / 'cache'} /var/cache/mergesearch && "
            f"mount --bind {termination} {container.get('terminationMessagePath', TERMINATION_LOG)} && "
            'exec "$@"'
        )
        number = next(self._pod_numbers)
        started, pod_ip = _now(), f"127.0.{10 + number // 250}.{1 + number % 250}"
        self._patch(
            name,
            {
                "phase": "Running",
                "podIP": pod_ip,
                "startTime": started,
                "containerStatuses": [self._container_status(container, True, {"running": {"startedAt": started}})],
            },
        )
        with (pod_dir / "log").open("wb") as log:
            process = subprocess.Popen(
                [*UNSHARE, "sh", "-c", mounts, "sh", *command],
                env=self._env(container, pod_ip),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
        self.processes[name] = process
        self.started.append(name)
        deadline = pod["spec"].get("activeDeadlineSeconds")
        try:
            code = process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            self._patch(
                name,
                {
                    "phase": "Failed",
                    "reason": "DeadlineExceeded",
                    "message": f"Pod was active on the node longer than {deadline}s",
                },
            )
            return
        finally:
            self.processes.pop(name, None)
        message = termination.read_text()
        if not message and code != 0:  # terminationMessagePolicy: FallbackToLogsOnError
            message = (pod_dir / "log").read_text()[-2048:]
        reason = "OOMKilled" if fault == "oom" else ("Completed" if code == 0 else "Error")
        self._patch(
            name,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [
                    self._container_status(
                        container,
                        False,
                        {
                            "terminated": {
                                "exitCode": code,
                                "reason": reason,
                                "message": message[-4096:],
                                "startedAt": started,
                                "finishedAt": _now(),
                            }
                        },
                    )
                ],
            },
        )
