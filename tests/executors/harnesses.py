"""Each executor with what drives it in tests, behind one face, for the executor contract suite.

A harness holds an executor and the state it runs over: a work directory of real processes (local), or a
`FakeCluster` (the pod executors), whose kubelet moves pods along one `step()` at a time. Worker pods
run real workers: the local executor served over HTTP on loopback, as `mergesearch worker` does, so the
worker pod executor is driven through the real client. Only the cluster is faked.

Every harness can:
- `spec(name, outcome)`: a trial spec whose run succeeds ("ok") or fails as the request's fault ("user");
- `step()`: let time pass (the kubelet moves pods, the watch shows them to the executor);
- `hold(name)` / `resume(name)`: keep a started run running (a stopped process, a pod the kubelet
  leaves alone) until resumed;
- `break_down(name)`: the machine under a held run fails (its process is killed, its pod is OOMKilled);
- `restart()`: a new executor object over the same state (the operator or `mergesearch run` restarted);
- `starts(name)`: how many times the run began in the state (processes forked, pods created).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import HTTPServer
from pathlib import Path
from typing import Any, Literal

from mergesearch_operator.executors.base import Executor
from mergesearch_operator.executors.local import LocalExecutor
from mergesearch_operator.executors.worker import WorkerClient, serve
from mergesearch_operator.k8s.executor import KubernetesExecutor, PodView
from mergesearch_operator.k8s.pods import LABEL_ROLE, ROLE_WORKER, spec_of
from mergesearch_operator.k8s.settings import OperatorSettings
from mergesearch_operator.k8s.workers import WorkerPodExecutor
from mergesearch_operator.spec import Trial
from mergesearch_trial_runner.spec import EXIT_USER_ERROR, TrialResult, TrialSpec
from mergesearch_trial_runner.testbed.models import World
from tests.cluster.fakes import spec as pod_spec
from tests.runner.runs import reverse_trial

Outcome = Literal["ok", "user"]
SEARCH, NAMESPACE, TOKEN = "s", "ns", "contract-token"
HOLD_TIMEOUT = 120.0  # seconds for a started run's process to appear (the fork server imports torch first)


class Harness(ABC):
    name: str
    executor: Executor

    @abstractmethod
    def spec(self, name: str, outcome: Outcome = "ok") -> TrialSpec: ...

    @abstractmethod
    def step(self) -> None: ...

    @abstractmethod
    def hold(self, name: str) -> None: ...

    @abstractmethod
    def resume(self, name: str) -> None: ...

    @abstractmethod
    def break_down(self, name: str) -> None: ...

    @abstractmethod
    def restart(self) -> Executor: ...

    @abstractmethod
    def starts(self, name: str) -> int: ...

    def close(self) -> None:
        self.executor.close()


# --- real processes ---------------------------------------------------------------------------------------


def _pid(runs_dir: Path, name: str) -> int | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        return json.loads((runs_dir / name / "pid").read_text())["pid"]
    return None


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


class Processes:
    """The runs of local executors, held by stopping their process group (SIGSTOP): a stopped process
    is alive, so its run stays RUNNING, and it carries on where it was when resumed."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def hold(self, harness: Harness, runs_dirs: Callable[[], list[Path]], name: str) -> None:
        deadline = time.monotonic() + HOLD_TIMEOUT
        while (pid := next((p for d in runs_dirs() if (p := _pid(d, name))), None)) is None:
            assert time.monotonic() < deadline, f"the run {name} never started a process"
            harness.executor.poll(name)  # a worker pod executor hands runs to workers when polled
            harness.step()
        _signal(pid, signal.SIGSTOP)
        self.held[name] = pid
        if any((d / name / "result.json").exists() for d in runs_dirs()):
            raise AssertionError(f"the run {name} finished before it could be held")

    def resume(self, name: str) -> None:
        _signal(self.held.pop(name), signal.SIGCONT)

    def kill(self, name: str) -> None:
        _signal(self.held.pop(name), signal.SIGKILL)

    def close(self) -> None:
        for name in list(self.held):
            self.kill(name)


def _real_spec(world: World, scratch: Path, name: str, outcome: Outcome) -> TrialSpec:
    spec = reverse_trial(world, scratch / name, name)
    if outcome == "user":  # a task file that does not exist: the runner's verdict is a user error
        missing = spec.tasks[0].model_copy(update={"data": str(scratch / "no-such-task.jsonl")})
        spec = spec.model_copy(update={"tasks": [missing]})
    return spec


def _ledger_count(ledger: Path, name: str) -> int:
    if not ledger.exists():
        return 0
    return sum(1 for line in ledger.read_text().splitlines() if line.split()[-1] == name)


class LocalHarness(Harness):
    name = "local"

    def __init__(self, world: World, tmp: Path) -> None:
        self.world, self.tmp, self.work = world, tmp, tmp / "work"
        self.processes = Processes()
        self.executor = self._new()

    def _new(self) -> LocalExecutor:
        return LocalExecutor(self.work, timeout_seconds=300)

    def spec(self, name: str, outcome: Outcome = "ok") -> TrialSpec:
        return _real_spec(self.world, self.tmp, name, outcome)

    def step(self) -> None:
        time.sleep(0.1)

    def hold(self, name: str) -> None:
        self.processes.hold(self, lambda: [self.work / "runs"], name)

    def resume(self, name: str) -> None:
        self.processes.resume(name)

    def break_down(self, name: str) -> None:
        self.processes.kill(name)

    def restart(self) -> Executor:
        self.executor.close()  # its fork server leaves once its runs are done; they go on regardless
        self.executor = self._new()
        return self.executor

    def starts(self, name: str) -> int:
        return _ledger_count(self.work / "runs.log", name)

    def close(self) -> None:
        self.processes.close()
        super().close()


# --- a fake cluster ---------------------------------------------------------------------------------------


@dataclass
class FakePod:
    body: dict[str, Any]
    created: float
    phase: str = "Pending"
    ip: str = ""
    reason: str = ""
    terminated: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def worker(self) -> bool:
        return self.body["metadata"].get("labels", {}).get(LABEL_ROLE) == ROLE_WORKER

    def view(self) -> PodView:
        return PodView(
            name=self.name,
            phase=self.phase,
            created=self.created,
            reason=self.reason,
            message=self.terminated.get("message", ""),
            exit_code=self.terminated.get("exit_code"),
            terminated_reason=self.terminated.get("reason", ""),
            started=self.created if self.terminated else None,
            finished=self.created + 10.0 if self.terminated else None,
            ip=self.ip,
        )


@dataclass
class RealWorker:
    """A worker pod's container: the local executor served over HTTP on loopback."""

    executor: LocalExecutor
    server: HTTPServer

    @classmethod
    def start(cls, work: Path) -> RealWorker:
        executor = LocalExecutor(work, timeout_seconds=300)
        server = serve(executor, host="127.0.0.1", port=0, token=TOKEN)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return cls(executor, server)

    @property
    def address(self) -> str:
        return "{}:{}".format(*self.server.server_address[:2])

    def stop(self) -> None:
        """The pod's processes die with it: the server, the fork server and every run."""
        self.server.shutdown()
        self.server.server_close()
        for name in self.executor.held():
            if (pid := _pid(self.executor.runs_dir, name)) is not None:
                _signal(pid, signal.SIGKILL)
        self.executor.close()


class FakeCluster:
    """The pod executors' outside world: the API (create and delete pods) and a kubelet that `step()`
    moves pods along: Pending, then Running, then (trial pods not held) finished as their run's outcome
    says. Worker pods run a `RealWorker` once Running, reached through their pod IP."""

    def __init__(self, clock: Any, work: Path) -> None:
        self.clock, self.work = clock, work
        self.pods: dict[str, FakePod] = {}
        self.created: list[str] = []  # every pod created, in order
        self.outcomes: dict[str, Outcome] = {}  # trial pod -> how its run ends
        self.held: set[str] = set()  # trial pods the kubelet leaves running
        self.workers: dict[str, RealWorker] = {}  # worker pod -> its container
        self.addresses: dict[str, str] = {}  # pod IP:port -> where its worker listens
        self._ips = iter(range(1, 250))

    # the API (KubernetesApi's methods the executors call)
    def create_pod(self, namespace: str, body: dict[str, Any]) -> bool:
        name = body["metadata"]["name"]
        if name in self.pods:
            return False  # 409: the executors ignore it
        self.pods[name] = FakePod(body=body, created=self.clock())
        self.created.append(name)
        return True

    def delete_pod(self, namespace: str, name: str) -> None:
        if self.pods.pop(name, None) is not None and name in self.workers:
            self.workers.pop(name).stop()

    # the kubelet
    def views(self) -> dict[str, PodView]:
        return {name: pod.view() for name, pod in self.pods.items()}

    def step(self) -> None:
        for pod in list(self.pods.values()):
            if pod.phase == "Pending":
                pod.phase, pod.ip = "Running", f"10.0.0.{next(self._ips)}"
                if pod.worker:
                    worker = RealWorker.start(self.work / pod.name)
                    self.workers[pod.name] = worker
                    self.addresses[f"{pod.ip}:8080"] = worker.address
            elif pod.phase == "Running" and not pod.worker and pod.name not in self.held:
                self._finish(pod)

    def _finish(self, pod: FakePod) -> None:
        spec = spec_of(pod.body)
        if self.outcomes.get(pod.name, "ok") == "ok":
            tasks = {name: {"correct": 1, "evaluated": end - start} for name, (start, end) in spec.ranges.items()}
            result = TrialResult(name=spec.name, ok=True, tasks=tasks)
            pod.phase, pod.terminated = "Succeeded", {"exit_code": 0, "reason": "Completed"}
        else:
            result = TrialResult(name=spec.name, ok=False, error_kind="user", message="TaskDataError: no such file")
            pod.phase, pod.terminated = "Failed", {"exit_code": EXIT_USER_ERROR, "reason": "Error"}
        pod.terminated["message"] = "a log line\n" + result.compact_json()

    def fail(self, name: str) -> None:
        """The pod runs out of memory: its processes are killed."""
        pod = self.pods[name]
        pod.phase, pod.terminated = "Failed", {"exit_code": 137, "reason": "OOMKilled"}
        self.held.discard(name)
        if name in self.workers:
            self.workers.pop(name).stop()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()


def _pod_executor_args(cluster: FakeCluster, clock: Any) -> dict[str, Any]:
    return {
        "api": cluster,
        "search": SEARCH,
        "namespace": NAMESPACE,
        "owner_uid": "uid-1",
        "trial": Trial(),
        "s3_secret": "s3",
        "settings": OperatorSettings(),
        "clock": clock,
    }


class PodHarness(Harness):
    """The Kubernetes executor (a pod per run) over the fake cluster, with a clock that each step moves
    on a second."""

    name = "pod"

    def __init__(self, tmp: Path) -> None:
        self.now = 1000.0
        self.cluster = FakeCluster(lambda: self.now, tmp)
        self.executor = self._new()

    def _new(self) -> KubernetesExecutor:
        executor = KubernetesExecutor(**_pod_executor_args(self.cluster, lambda: self.now))
        executor.observe(self.cluster.views())  # a watch starts with a listing
        return executor

    def spec(self, name: str, outcome: Outcome = "ok") -> TrialSpec:
        self.cluster.outcomes[name] = outcome
        return pod_spec(name)

    def step(self) -> None:
        self.now += 1.0
        self.cluster.step()
        self.executor.observe(self.cluster.views())

    def hold(self, name: str) -> None:
        """Keep the pod running, once the watch shows it running (as a held process has started)."""
        self.cluster.held.add(name)
        while (pod := self.executor.pods.get(name)) is None or pod.phase != "Running":
            assert name in self.cluster.pods, f"the pod of {name} was never created"
            self.step()

    def resume(self, name: str) -> None:
        self.cluster.held.discard(name)

    def break_down(self, name: str) -> None:
        self.cluster.fail(name)

    def restart(self) -> Executor:
        self.executor = self._new()
        return self.executor

    def starts(self, name: str) -> int:
        return self.cluster.created.count(name)


class WorkerPodHarness(Harness):
    """The worker pod executor over the fake cluster, whose worker pods run real workers (real trials,
    over HTTP). The clock is the real one: the workers' runs take real time."""

    name = "worker-pod"

    def __init__(self, world: World, tmp: Path) -> None:
        self.world, self.tmp = world, tmp
        self.cluster = FakeCluster(time.time, tmp / "pods")
        self.processes = Processes()
        self.executor = self._new()

    def _new(self) -> WorkerPodExecutor:
        executor = WorkerPodExecutor(
            token_secret=f"{SEARCH}-worker-token",
            token=TOKEN,
            connect=lambda address, token: WorkerClient(self.cluster.addresses[address], token),
            **_pod_executor_args(self.cluster, time.time),
        )
        executor.observe(self.cluster.views())
        return executor

    def _runs_dirs(self) -> list[Path]:
        return [worker.executor.runs_dir for worker in self.cluster.workers.values()]

    def spec(self, name: str, outcome: Outcome = "ok") -> TrialSpec:
        return _real_spec(self.world, self.tmp, name, outcome)

    def step(self) -> None:
        time.sleep(0.1)
        self.cluster.step()
        self.executor.observe(self.cluster.views())

    def hold(self, name: str) -> None:
        self.processes.hold(self, self._runs_dirs, name)

    def resume(self, name: str) -> None:
        self.processes.resume(name)

    def break_down(self, name: str) -> None:
        """The worker pod that holds the run is OOMKilled."""
        (worker,) = [w for w, real in self.cluster.workers.items() if (real.executor.runs_dir / name).exists()]
        self.processes.held.pop(name)
        self.cluster.fail(worker)

    def restart(self) -> Executor:
        self.executor = self._new()
        return self.executor

    def starts(self, name: str) -> int:
        return sum(_ledger_count(self.tmp / "pods" / worker / "runs.log", name) for worker in self.cluster.created)

    def close(self) -> None:
        self.processes.close()
        self.cluster.close()
