"""Worker pods (`spec.trial.reusePods`): the pod, and the executor's rules for handing runs to workers.

The workers here answer through `FakeWorker`, a stand-in for the HTTP client that answers as a worker
would; the real server and client are tested in `tests/runner/test_worker.py`, and the whole loop on the
emulator in `test_e2e.py`. These tests pin down the timing rules, which need a clock the test moves.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergesearch_operator.executors.base import RunPhase, RunStatus
from mergesearch_operator.executors.worker import TOKEN_ENV, WorkerUnreachable
from mergesearch_operator.k8s.executor import PodView
from mergesearch_operator.k8s.pods import LABEL_ROLE, LABEL_SEARCH, worker_pod
from mergesearch_operator.k8s.settings import OperatorSettings
from mergesearch_operator.k8s.workers import WorkerPodExecutor
from mergesearch_operator.podtemplate import CACHE_DIR, CACHE_HOME_ENV
from mergesearch_operator.search.study import defining, effective_spec
from mergesearch_operator.spec import Trial, parse_manifest
from mergesearch_trial_runner.spec import TrialSpec
from tests.cluster.fakes import RecordingApi, spec

SETTINGS = OperatorSettings(
    image_pull_seconds=30, unschedulable_seconds=60, worker_idle_seconds=50, worker_unreachable_seconds=100
)


def test_the_worker_pod():
    pod = worker_pod(
        name="s-w0",
        search="s",
        namespace="ns",
        owner_uid="uid-1",
        trial=Trial(backend="vllm", timeout_seconds=900),
        s3_secret="creds",
        token_secret="s-worker-token",
        settings=SETTINGS,
    )
    meta, body = pod["metadata"], pod["spec"]
    assert meta["labels"][LABEL_SEARCH] == "s" and meta["labels"][LABEL_ROLE] == "worker"
    assert meta["ownerReferences"][0]["uid"] == "uid-1"
    assert "activeDeadlineSeconds" not in body  # each run has its deadline, kept by the worker
    container = body["containers"][0]
    assert container["command"] == ["mergesearch"]
    assert container["args"] == ["worker", "--backend", "vllm", "--timeout-seconds", "900"]
    env = {v["name"]: v for v in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env[TOKEN_ENV]["valueFrom"]["secretKeyRef"] == {"name": "s-worker-token", "key": "token"}
    # Every value comes from a reference, but the node cache's path, which is no secret.
    assert [v["name"] for v in container["env"] if "value" in v] == [CACHE_HOME_ENV]
    assert env[CACHE_HOME_ENV]["value"] == CACHE_DIR
    assert container["ports"] == [{"name": "runs", "containerPort": 8080}]


class FakeWorker:
    """Answers as a worker's HTTP endpoint would: runs it holds, each with a phase the test sets."""

    def __init__(self):
        self.held: dict[str, RunPhase] = {}
        self.reachable = True
        self.started: list[str] = []
        self.cancelled: list[str] = []

    def _check(self) -> None:
        if not self.reachable:
            raise WorkerUnreachable("connection refused")

    def start(self, spec: TrialSpec) -> None:
        self._check()
        self.held.setdefault(spec.name, RunPhase.RUNNING)
        self.started.append(spec.name)

    def poll(self, name: str) -> RunStatus:
        self._check()
        return RunStatus(self.held.get(name, RunPhase.MISSING))

    def cancel(self, name: str) -> None:
        self._check()
        self.cancelled.append(name)

    def release(self, name: str) -> None:
        self._check()
        self.held.pop(name, None)

    def runs(self) -> list[str]:
        self._check()
        return sorted(self.held)


class World:
    """An executor, the pods the watch shows it, the workers behind their IPs, and a clock."""

    def __init__(self):
        self.now = 1000.0
        self.api = RecordingApi()
        self.workers: dict[str, FakeWorker] = {}  # by address
        self.views: dict[str, PodView] = {}
        self.executor = self.new_executor()

    def new_executor(self) -> WorkerPodExecutor:
        return WorkerPodExecutor(
            api=self.api,
            search="s",
            namespace="ns",
            owner_uid="u",
            trial=Trial(),
            s3_secret="x",
            token_secret="s-worker-token",
            token="t",
            settings=SETTINGS,
            clock=lambda: self.now,
            connect=lambda address, token: self.workers[address],
        )

    def run_pod(self, name: str, ip: str) -> FakeWorker:
        """The pod is running and its worker listens."""
        self.views[name] = PodView(name=name, phase="Running", created=self.now, ip=ip)
        self.workers[f"{ip}:8080"] = FakeWorker()
        self.observe()
        return self.workers[f"{ip}:8080"]

    def observe(self) -> None:
        self.executor.observe(dict(self.views))


def test_a_run_waits_for_its_new_worker_then_the_worker_takes_the_next_run():
    world = World()
    ex = world.executor
    ex.start(spec("s-t0-r0"))
    assert world.api.created == ["s-w0"] and ex.poll("s-t0-r0").phase == RunPhase.RUNNING
    world.views["s-w0"] = PodView(name="s-w0", phase="Pending", created=world.now)
    world.observe()
    assert ex.poll("s-t0-r0").phase == RunPhase.RUNNING  # pending: nothing to hand over to
    world.now += 900  # a long image pull: silence before the pod runs does not count
    assert ex.poll("s-t0-r0").phase == RunPhase.RUNNING
    worker = world.run_pod("s-w0", "10.0.0.5")
    worker.reachable = False  # still importing its backend
    assert ex.poll("s-t0-r0").phase == RunPhase.RUNNING and worker.started == []
    worker.reachable = True
    assert ex.poll("s-t0-r0").phase == RunPhase.RUNNING and worker.started == ["s-t0-r0"]
    ex.start(spec("s-t1-r0"))  # w0 is busy: a second worker
    assert world.api.created == ["s-w0", "s-w1"]
    worker.held["s-t0-r0"] = RunPhase.SUCCEEDED
    assert ex.poll("s-t0-r0").phase == RunPhase.SUCCEEDED
    ex.release("s-t0-r0")
    assert "s-t0-r0" not in worker.held
    ex.start(spec("s-t2-r0"))
    ex.start(spec("s-t2-r0"))
    assert world.api.created == ["s-w0", "s-w1"] and worker.started == ["s-t0-r0", "s-t2-r0"]


def test_a_worker_that_cannot_pull_its_image_fails_its_run_as_a_user_error_and_is_deleted():
    world = World()
    ex = world.executor
    ex.start(spec("s-t0-r0"))
    world.views["s-w0"] = PodView(name="s-w0", phase="Pending", created=world.now, waiting_reason="ErrImagePull")
    world.observe()
    assert ex.poll("s-t0-r0").phase == RunPhase.RUNNING
    world.now += 31
    status = ex.poll("s-t0-r0")
    assert (status.phase, status.failure, status.cause) == (RunPhase.FAILED, "user", "ImagePull")
    ex.release("s-t0-r0")
    assert world.api.deleted == ["s-w0"]


def test_a_worker_that_is_deleted_or_stops_answering_loses_its_run():
    world = World()
    ex = world.executor
    ex.start(spec("s-t0-r0"))
    ex.start(spec("s-t1-r0"))
    world.run_pod("s-w0", "10.0.0.5")
    silent = world.run_pod("s-w1", "10.0.0.6")
    assert ex.poll("s-t0-r0").phase == ex.poll("s-t1-r0").phase == RunPhase.RUNNING
    world.views["s-w0"] = PodView(name="s-w0", phase="Running", created=world.now, ip="10.0.0.5", deleting=True)
    silent.reachable = False
    world.observe()
    status = ex.poll("s-t0-r0")
    assert (status.phase, status.cause) == (RunPhase.FAILED, "Lost")
    world.now += 99
    assert ex.poll("s-t1-r0").phase == RunPhase.RUNNING
    world.now += 2
    status = ex.poll("s-t1-r0")
    assert (status.phase, status.cause) == (RunPhase.FAILED, "Lost") and "has not answered" in status.reason
    ex.release("s-t0-r0")
    ex.release("s-t1-r0")
    assert sorted(world.api.deleted) == ["s-w0", "s-w1"]
    ex.start(spec("s-t0-r0-a1"))  # the retry goes to a new worker, not to one being deleted
    assert world.api.created[-1] == "s-w2"
    ex.release("s-t0-r0-a1")
    del world.views["s-w0"], world.views["s-w1"]  # the deleted pods are gone: their names are free again
    world.observe()
    ex.start(spec("s-t1-r0-a1"))
    ex.start(spec("s-t2-r0"))
    assert world.api.created[-2:] == ["s-w2", "s-w0"]  # w2 was idle
    worker = world.run_pod("s-w0", "10.0.0.8")
    assert ex.poll("s-t2-r0").phase == RunPhase.RUNNING and worker.started == ["s-t2-r0"]
    worker.held["s-t2-r0"] = RunPhase.SUCCEEDED
    ex.release("s-t2-r0")
    ex.start(spec("s-t3-r0"))  # the new w0 is idle now, and takes it
    assert world.api.created[-1] == "s-w0" and worker.started == ["s-t2-r0", "s-t3-r0"]


def test_a_restarted_operator_finds_the_runs_its_workers_hold():
    world = World()
    ex = world.executor
    ex.start(spec("s-t0-r0"))
    worker = world.run_pod("s-w0", "10.0.0.5")
    assert ex.poll("s-t0-r0").phase == RunPhase.RUNNING
    world.executor = restarted = world.new_executor()  # the operator restarts: nothing in memory
    worker.reachable = False
    world.observe()
    assert restarted.poll("s-t0-r0").phase == RunPhase.RUNNING  # w0 has not said what it holds yet
    worker.reachable = True
    world.observe()
    restarted.start(spec("s-t0-r0"))  # the controller starts what it thinks missing: no second copy
    assert worker.started == ["s-t0-r0"] and world.api.created == ["s-w0"]
    worker.held["s-t0-r0"] = RunPhase.SUCCEEDED
    assert restarted.poll("s-t0-r0").phase == RunPhase.SUCCEEDED
    assert restarted.poll("s-t9-r0").phase == RunPhase.MISSING


def test_after_a_restart_a_sweep_frees_workers_holding_runs_the_study_no_longer_wants():
    """The operator died between committing a run's result and releasing it: the worker still holds the
    finished run (and its GPU) until the restarted operator's sweep lets it go; a live run stays."""
    world = World()
    ex = world.executor
    ex.start(spec("s-t0-r0"))
    ex.start(spec("s-t1-r0"))
    finished, running = world.run_pod("s-w0", "10.0.0.5"), world.run_pod("s-w1", "10.0.0.6")
    assert ex.poll("s-t0-r0").phase == ex.poll("s-t1-r0").phase == RunPhase.RUNNING
    finished.held["s-t0-r0"] = RunPhase.SUCCEEDED
    world.executor = restarted = world.new_executor()  # the release was never sent
    world.observe()
    assert sorted(restarted.held()) == ["s-t0-r0", "s-t1-r0"]
    restarted.sweep({"s-t1-r0"})
    assert finished.held == {} and running.held == {"s-t1-r0": RunPhase.RUNNING}
    assert restarted.held() == ["s-t1-r0"] and world.api.deleted == []  # the worker waits for the next run
    restarted.start(spec("s-t2-r0"))
    assert finished.started == ["s-t0-r0", "s-t2-r0"]  # and takes it


def test_idle_workers_are_deleted_and_a_cancel_frees_a_worker():
    world = World()
    ex = world.executor
    ex.start(spec("s-t0-r0"))
    worker = world.run_pod("s-w0", "10.0.0.5")
    ex.poll("s-t0-r0")
    ex.cancel("s-t0-r0")
    assert worker.cancelled == ["s-t0-r0"] and worker.held == {}
    world.observe()
    world.now += 49
    world.observe()
    assert world.api.deleted == []
    world.now += 2
    world.observe()
    assert world.api.deleted == ["s-w0"]


def test_after_a_restart_workers_that_exited_or_stay_silent_are_deleted_and_pending_ones_reused():
    world = World()
    world.views["s-w0"] = PodView(name="s-w0", phase="Failed", created=world.now, exit_code=137)
    world.views["s-w1"] = PodView(name="s-w1", phase="Pending", created=world.now)
    silent = world.run_pod("s-w2", "10.0.0.7")
    silent.reachable = False
    world.observe()
    assert world.api.deleted == ["s-w0"]
    world.executor.start(spec("s-t0-r0"))  # the pending worker holds nothing: it takes the run
    assert world.api.created == [] and world.executor.runs == {"s-t0-r0": "s-w1"}
    world.now += 101
    world.observe()
    assert world.api.deleted == ["s-w0", "s-w2"]


def test_reuse_pods_the_sampler_and_its_seed_are_fixed_once_a_search_has_started():
    example = Path(__file__).parents[2] / "manifests" / "examples" / "lfs-single-objective.yaml"
    document = yaml.safe_load(example.read_text())
    first = parse_manifest(document).spec
    accepted = defining(first)
    document["spec"].setdefault("trial", {})["reusePods"] = not first.trial.reuse_pods
    document["spec"]["trial"]["timeoutSeconds"] = 1234
    search = document["spec"].setdefault("search", {})
    search.update(multiFidelity=not first.search.multi_fidelity, seed=first.search.seed + 1, sampler="random")
    document["spec"].setdefault("budget", {})["maxTrials"] = first.budget.max_trials + 5
    edited = parse_manifest(document).spec
    spec, refused = effective_spec(edited, accepted)
    # named as the user writes them
    assert refused == ["search.multiFidelity", "search.sampler", "search.seed", "trial.reusePods"]
    assert spec.trial.reuse_pods == first.trial.reuse_pods and spec.trial.timeout_seconds == 1234
    assert (spec.search.sampler, spec.search.seed) == (first.search.sampler, first.search.seed)
    assert spec.budget.max_trials == first.budget.max_trials + 5  # budgets may change
    accepted.pop("trial")  # a study from before reusePods: whatever it says now is accepted
    assert "trial.reusePods" not in effective_spec(edited, accepted)[1]
