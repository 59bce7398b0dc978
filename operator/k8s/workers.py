"""Trial runs in long-lived worker pods: the executor of a search with `spec.trial.reusePods`.

A worker pod (`pods.worker_pod`) runs `mergesearch worker`: the local executor behind an HTTP endpoint
(`executors.worker`), which imports the backend once and then runs trial after trial. This executor
keeps at most one run on each worker:

- `start` hands the run to an idle worker, or creates a worker for it (`<search>-w<n>`). Until the
  worker answers (scheduled, image pulled, backend imported) the run waits here, and the worker pod's
  troubles (an image that cannot be pulled, no node to take it) are the run's, as with a pod per run.
- `poll` asks the run's worker. A worker pod that fails, is deleted, or does not answer for
  `worker_unreachable_seconds` loses its run (an infrastructure failure: retried, on another worker).
- `release` and `cancel` free the worker for the next run; a worker in trouble is deleted instead. A
  worker idle for `worker_idle_seconds` is deleted, so a finished search holds no devices.
- After an operator restart each worker is asked which runs it holds, so they are found again rather
  than started twice; a worker that has exited, or does not answer in `worker_unreachable_seconds`,
  is deleted (its runs count as missing and start again).

Which run is on which worker lives in memory and in the workers. Polls ask the workers, not the watch:
a run finishing inside a worker changes no pod.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from mergesearch_trial_runner.spec import TrialSpec

from ..executors.base import RunPhase, RunStatus
from ..executors.worker import PORT, WorkerClient, WorkerError, WorkerUnreachable
from .executor import CREATE_GRACE_SECONDS, PodExecutor, PodView, failed, pod_trouble
from .pods import worker_pod

log = logging.getLogger(__name__)


class WorkerPodExecutor(PodExecutor):
    pods_show_progress = False  # runs finish inside workers: the handlers must poll even when no pod changed

    def __init__(
        self,
        *,
        token_secret: str,
        token: str,
        connect: Callable[[str, str], WorkerClient] = WorkerClient,
        **pod_executor: Any,
    ):
        super().__init__(**pod_executor)
        self.token_secret, self.token, self.connect = token_secret, token, connect
        self.worker_name = re.compile(rf"^{re.escape(self.search)}-w\d+$")
        self.runs: dict[str, str] = {}  # run -> its worker
        self._waiting: dict[str, TrialSpec] = {}  # runs whose worker has not taken them yet
        self._lost: dict[str, str] = {}  # run -> why it is lost (until released)
        self._deleted: set[str] = set()  # workers deleted by this executor, still in the watch's view
        self._contact: dict[str, float] = {}  # worker -> its last answer (or its creation)
        self._idle_since: dict[str, float] = {}
        self._known: set[str] = set()  # workers whose runs this executor knows (it made them, or asked)
        self._born = self.clock()

    # --- the workers ------------------------------------------------------------------------------------

    def observe(self, pods: Mapping[str, PodView]) -> None:
        """Take the watch's view of the search's pods; find the runs of workers not known yet; delete
        workers idle too long."""
        super().observe({name: pod for name, pod in pods.items() if self.worker_name.match(name)})
        self._deleted &= set(self.pods)
        now = self.clock()
        for name, pod in self.pods.items():
            if name in self._known or name in self._deleted or pod.deleting:
                continue
            if pod.phase == "Pending":  # its container never ran: it holds no run
                self._known.add(name)
            elif self._answers(pod):
                self._ask_for_runs(name)
            if name not in self._known and (
                pod.phase not in ("Pending", "Running") or now - self._born > self.settings.worker_unreachable_seconds
            ):
                self._delete(name)  # from before a restart, and gone or silent: its runs are started again
        busy = set(self.runs.values())
        for name in self._known - busy:
            if now - self._idle_since.setdefault(name, now) > self.settings.worker_idle_seconds:
                self._delete(name)

    @staticmethod
    def _answers(pod: PodView) -> bool:
        return pod.phase == "Running" and bool(pod.ip) and not pod.deleting

    def _client(self, worker: str) -> WorkerClient:
        return self.connect(f"{self.pods[worker].ip}:{PORT}", self.token)

    def _ask_for_runs(self, worker: str) -> None:
        try:
            held = self._client(worker).runs()
        except (WorkerUnreachable, WorkerError):
            return  # asked again at the next observe
        for run in held:
            self.runs.setdefault(run, worker)
        log.info("worker %s holds %s", worker, held)
        self._known.add(worker)
        self._contact[worker] = self.clock()

    def _create(self) -> str:
        taken = set(self.pods) | set(self._created) | self._deleted  # a name comes free once its pod is gone
        name = next(f"{self.search}-w{i}" for i in itertools.count() if f"{self.search}-w{i}" not in taken)
        body = worker_pod(name=name, token_secret=self.token_secret, **self._pod_args())
        self.api.create_pod(self.namespace, body)
        log.info("created worker %s", name)
        now = self.clock()
        self._created[name], self._contact[name] = now, now
        self._known.add(name)
        return name

    def _delete(self, worker: str) -> None:
        log.info("deleting worker %s", worker)
        self.api.delete_pod(self.namespace, worker)
        self._deleted.add(worker)
        self._known.discard(worker)
        for state in (self._created, self._contact, self._idle_since):
            state.pop(worker, None)

    def _idle_worker(self) -> str | None:
        busy = set(self.runs.values())
        idle = [
            name
            for name in sorted(self._known - busy - self._deleted)
            if name in self._created or (name in self.pods and self.pods[name].phase in ("Pending", "Running"))
        ]
        return next((name for name in idle if not (name in self.pods and self.pods[name].deleting)), None)

    # --- the runs ---------------------------------------------------------------------------------------

    def start(self, spec: TrialSpec) -> None:
        if spec.name in self.runs:
            return
        worker = self._idle_worker() or self._create()
        self.runs[spec.name] = worker
        self._idle_since.pop(worker, None)
        self._waiting[spec.name] = spec
        self._hand_over(spec.name)

    def _hand_over(self, run: str) -> None:
        worker = self.runs[run]
        pod = self.pods.get(worker)
        if pod is None or not self._answers(pod):
            return
        try:
            self._client(worker).start(self._waiting[run])
        except WorkerUnreachable:
            return  # not listening yet: its backend is still importing
        except WorkerError as exc:
            self._lost[run] = str(exc)
            return
        del self._waiting[run]
        self._contact[worker] = self.clock()
        log.info("run %s handed to worker %s", run, worker)

    def _lose(self, run: str, reason: str) -> RunStatus:
        log.warning("run %s is lost: %s", run, reason)
        self._lost[run] = reason
        return failed("infrastructure", "Lost", reason)

    def poll(self, name: str) -> RunStatus:
        worker = self.runs.get(name)
        now = self.clock()
        if worker is None:
            # A worker that has not said which runs it holds may hold this one (after a restart).
            unknown = any(n not in self._known and self._answers(p) for n, p in self.pods.items())
            pending = unknown and now - self._born < self.settings.worker_unreachable_seconds
            return RunStatus(RunPhase.RUNNING if pending else RunPhase.MISSING)
        if name in self._lost:
            return failed("infrastructure", "Lost", self._lost[name])
        pod = self.pods.get(worker)
        if pod is None:
            if now - self._created.get(worker, -CREATE_GRACE_SECONDS) < CREATE_GRACE_SECONDS:
                return RunStatus(RunPhase.RUNNING)
            return self._lose(name, f"worker {worker} is gone")
        if pod.phase == "Succeeded":
            return self._lose(name, f"worker {worker} exited")
        trouble = pod_trouble(pod, trial=self.trial, settings=self.settings, now=now)
        if trouble is not None:
            return trouble
        if name in self._waiting:
            self._hand_over(name)
        if name not in self._waiting and name not in self._lost:
            try:
                status = self._client(worker).poll(name)
            except WorkerUnreachable:
                status = None
            except WorkerError as exc:
                return self._lose(name, str(exc))
            if status is not None:
                self._contact[worker] = now
                if status.phase is RunPhase.MISSING:
                    return self._lose(name, f"worker {worker} does not hold the run")
                return status
        if name in self._lost:
            return failed("infrastructure", "Lost", self._lost[name])
        if not self._answers(pod):  # pulling its image, say: it is not expected to answer yet
            self._contact[worker] = now
        silent = now - self._contact.get(worker, now)
        if silent > self.settings.worker_unreachable_seconds:
            return self._lose(name, f"worker {worker} has not answered for {silent:.0f}s")
        return RunStatus(RunPhase.RUNNING)

    def _free(self, name: str, worker: str) -> None:
        del self.runs[name]
        self._waiting.pop(name, None)
        if worker in self._known:  # not deleted: it waits for the next run
            self._idle_since[worker] = self.clock()

    def held(self) -> list[str]:
        """The runs the workers hold (as they said when first asked) or are about to be handed."""
        return list(self.runs)

    def release(self, name: str) -> None:
        """Free the run's worker for the next run; a worker in trouble (or that lost the run) is deleted."""
        worker = self.runs.get(name)
        if worker is None:
            return
        pod = self.pods.get(worker)
        in_trouble = (
            name in self._lost
            or (pod is None and worker not in self._created)
            or (pod is not None and pod.phase == "Succeeded")
            or (
                pod is not None
                and pod_trouble(pod, trial=self.trial, settings=self.settings, now=self.clock()) is not None
            )
        )
        if in_trouble:
            self._delete(worker)
        elif name not in self._waiting:
            self._client(worker).release(name)  # raises when unreachable: the controller retries the release
        self._lost.pop(name, None)
        self._free(name, worker)

    def cancel(self, name: str) -> None:
        """Stop the run; its worker takes the next one (or is deleted when it cannot be told to stop)."""
        worker = self.runs.get(name)
        if worker is None:
            return
        if name not in self._waiting and name not in self._lost and worker in self.pods:
            try:
                client = self._client(worker)
                client.cancel(name)
                client.release(name)
            except (WorkerUnreachable, WorkerError):
                self._delete(worker)
        self._lost.pop(name, None)
        self._free(name, worker)
