"""Trial runs as pods: the executor the operator gives the search controller.

It never lists pods: kopf watches them and keeps an index (`handlers.trial_pods`), which the executor
reads, so polling costs no API request; a run costs one create and one delete. A pod created but not
yet seen by the watch counts as running, so a run is never created twice by one operator, and a second
create after a restart is answered 409 and ignored.

Pod states become run outcomes:
- Succeeded: the termination message holds the runner's result.
- Failed: OOMKilled, DeadlineExceeded (activeDeadlineSeconds) and crashes are infrastructure failures
  (retried); exit code 65 is the runner's verdict that the request itself is wrong (recorded).
- Pending: an image that cannot be pulled for `image_pull_seconds` is a user error (the spec names it);
  a pod unschedulable for `unschedulable_seconds` is an infrastructure failure (released, so
  deleted, once the failure is stored, and retried).
- Gone, or deleted before it finished: infrastructure (Lost).

`pod_trouble` holds these rules for a pod that has not succeeded; `workers` applies them to worker pods
(`spec.trial.reusePods`), whose runs are not pods of their own.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from mergesearch_trial_runner.spec import EXIT_USER_ERROR, TrialResult, TrialSpec

from ..executors.base import Executor, RunPhase, RunStatus
from ..spec import Trial
from .api import KubernetesApi
from .pods import trial_pod
from .settings import OperatorSettings

log = logging.getLogger(__name__)
RUN_NAME = re.compile(r"-t(?P<trial>\d+)-r(?P<rung>\d+)(?:-a\d+)?$")
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
CREATE_GRACE_SECONDS = 120.0  # how long a created pod may stay unseen by the watch before it counts as lost


def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class PodView:
    """What the executor needs of a trial pod, as the watch last saw it."""

    name: str
    phase: str
    created: float | None
    reason: str = ""  # status.reason, e.g. DeadlineExceeded
    message: str = ""  # the termination message
    exit_code: int | None = None
    terminated_reason: str = ""  # e.g. OOMKilled, Error, Completed
    waiting_reason: str = ""  # e.g. ImagePullBackOff
    unschedulable: bool = False
    deleting: bool = False
    started: float | None = None
    finished: float | None = None
    ip: str = ""  # status.podIP

    @property
    def seconds(self) -> float:
        """How long the container ran, once it has finished."""
        return (self.finished - self.started) if self.finished and self.started else 0.0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PodView:
        metadata, status = body.get("metadata", {}), body.get("status") or {}
        container = next(iter(status.get("containerStatuses") or []), {})
        state = container.get("state") or {}
        terminated, waiting = state.get("terminated") or {}, state.get("waiting") or {}
        unschedulable = any(
            c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable"
            for c in status.get("conditions") or []
        )
        return cls(
            name=metadata["name"],
            phase=status.get("phase", "Pending"),
            created=_timestamp(metadata.get("creationTimestamp")),
            reason=status.get("reason", ""),
            message=terminated.get("message", ""),
            exit_code=terminated.get("exitCode"),
            terminated_reason=terminated.get("reason", ""),
            waiting_reason=waiting.get("reason", ""),
            unschedulable=unschedulable,
            deleting=bool(metadata.get("deletionTimestamp")),
            started=_timestamp(terminated.get("startedAt")),
            finished=_timestamp(terminated.get("finishedAt")),
            ip=status.get("podIP", ""),
        )


def _result(message: str) -> TrialResult | None:
    """The runner's result: the last JSON line of the termination message (logs may precede it)."""
    for line in reversed(message.strip().splitlines()):
        try:
            return TrialResult.model_validate_json(line)
        except (ValidationError, ValueError):
            continue
    return None


def failed(kind: str, cause: str, reason: str, seconds: float = 0.0) -> RunStatus:
    return RunStatus(RunPhase.FAILED, failure=kind, cause=cause, reason=reason, seconds=seconds)  # type: ignore[arg-type]


def pod_trouble(pod: PodView, *, trial: Trial, settings: OperatorSettings, now: float) -> RunStatus | None:
    """The failure that a pod's state means for the run in it; None while the pod may still get there."""
    if pod.phase == "Failed":
        return _classify_failed(pod, trial)
    if pod.deleting:
        return failed("infrastructure", "Lost", "the pod was deleted before it finished", pod.seconds)
    age = now - (pod.created or now)
    if pod.phase == "Pending":
        if pod.waiting_reason in IMAGE_PULL_REASONS and age > settings.image_pull_seconds:
            image = trial.image or settings.trial_image
            return failed("user", "ImagePull", f"cannot pull image {image}: {pod.waiting_reason}")
        if pod.unschedulable and age > settings.unschedulable_seconds:
            # Not deleted here: the controller stores the failure first, then releases the run.
            return failed("infrastructure", "Unschedulable", f"no node could take the pod in {age:.0f}s")
    return None


def _classify_failed(pod: PodView, trial: Trial) -> RunStatus:
    result, seconds = _result(pod.message), pod.seconds
    if pod.reason == "DeadlineExceeded":
        return failed("infrastructure", "DeadlineExceeded", f"ran over {trial.timeout_seconds}s", seconds)
    if pod.terminated_reason == "OOMKilled":
        return failed("infrastructure", "OOMKilled", "the trial ran out of memory", seconds)
    if pod.exit_code == EXIT_USER_ERROR or (result is not None and result.error_kind == "user"):
        message = result.message if result is not None else pod.message[-500:]
        return RunStatus(
            RunPhase.FAILED, result=result, failure="user", cause="UserError", reason=message, seconds=seconds
        )
    message = result.message if result is not None else pod.message[-500:]
    return failed("infrastructure", "Error", f"exit code {pod.exit_code}: {message}", seconds)


def gpus(trial: Trial) -> float:
    limits = trial.resources.get("limits", {})
    return float(limits.get("nvidia.com/gpu", 0) or 0)


class PodExecutor(Executor):
    """What both pod executors share: the search whose pods they create, how its trial pods run, and the
    watch's view of those pods."""

    pods_show_progress: bool  # whether a run's progress shows in its pod (else the handlers always poll)

    def __init__(
        self,
        *,
        api: KubernetesApi,
        search: str,
        namespace: str,
        owner_uid: str,
        trial: Trial,
        s3_secret: str,
        settings: OperatorSettings,
        clock: Callable[[], float] = time.time,
    ):
        self.api, self.search, self.namespace, self.owner_uid = api, search, namespace, owner_uid
        self.trial, self.s3_secret, self.settings, self.clock = trial, s3_secret, settings, clock
        self.accelerators_per_run = gpus(trial)
        self.pods: dict[str, PodView] = {}
        self._created: dict[str, float] = {}  # created by this operator, maybe not yet seen by the watch

    def observe(self, pods: Mapping[str, PodView]) -> None:
        """Take the watch's current view of this search's pods."""
        self.pods = dict(pods)
        for name in list(self._created):
            if name in self.pods:
                del self._created[name]

    def _pod_args(self) -> dict[str, Any]:
        """What every pod builder takes: whose pod it is and how trial pods run."""
        return {
            "search": self.search,
            "namespace": self.namespace,
            "owner_uid": self.owner_uid,
            "trial": self.trial,
            "s3_secret": self.s3_secret,
            "settings": self.settings,
        }


class KubernetesExecutor(PodExecutor):
    pods_show_progress = True  # a run's pod changes when the run does: no pod changed, nothing to poll

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._deleted: set[str] = set()  # deletes sent, until the watch shows the pod going or gone
        self._kept: set[str] = set()  # failed pods released but kept for debugging: no longer held

    def observe(self, pods: Mapping[str, PodView]) -> None:
        super().observe(pods)
        self._deleted = {name for name in self._deleted if name in self.pods and not self.pods[name].deleting}
        self._kept &= set(self.pods)

    def _delete(self, name: str) -> None:
        self.api.delete_pod(self.namespace, name)
        self._deleted.add(name)
        self._created.pop(name, None)  # deleted before the watch showed it: not held, not "lost" later

    def start(self, spec: TrialSpec) -> None:
        if spec.name in self.pods or spec.name in self._created:
            return
        match = RUN_NAME.search(spec.name)
        body = trial_pod(
            spec=spec,
            trial_number=int(match["trial"]) if match else None,
            rung=int(match["rung"]) if match else None,
            **self._pod_args(),
        )
        self.api.create_pod(self.namespace, body)
        self._created[spec.name] = self.clock()

    def poll(self, name: str) -> RunStatus:
        pod = self.pods.get(name)
        if pod is None:
            created = self._created.get(name)
            if created is None:
                return RunStatus(RunPhase.MISSING)
            if self.clock() - created < CREATE_GRACE_SECONDS:
                return RunStatus(RunPhase.RUNNING)
            return failed("infrastructure", "Lost", "the pod was created but never appeared")
        if pod.phase == "Succeeded":
            result = _result(pod.message)
            if result is not None and result.ok:
                return RunStatus(RunPhase.SUCCEEDED, result=result, seconds=pod.seconds)
            return failed("infrastructure", "Lost", "the pod succeeded without a result", pod.seconds)
        trouble = pod_trouble(pod, trial=self.trial, settings=self.settings, now=self.clock())
        return trouble or RunStatus(RunPhase.RUNNING, seconds=pod.seconds)

    def held(self) -> list[str]:
        """The search's run pods the watch shows (but those being deleted), and those just created."""
        seen = [
            name
            for name, pod in self.pods.items()
            if not pod.deleting and name not in self._deleted and name not in self._kept
        ]
        return seen + [name for name in self._created if name not in self.pods]

    def cancel(self, name: str) -> None:
        self._delete(name)

    def release(self, name: str) -> None:
        """Delete a finished run's pod; failed pods stay, the newest `keep_failed_pods` of them."""
        pod = self.pods.get(name)
        if pod is None or pod.phase != "Failed":
            self._delete(name)
            return
        self._kept.add(name)
        failed = sorted((p for p in self.pods.values() if p.phase == "Failed"), key=lambda p: p.created or 0.0)
        keep = self.settings.keep_failed_pods
        for old in failed[: max(0, len(failed) - keep)]:
            self._delete(old.name)
            self.pods.pop(old.name, None)
