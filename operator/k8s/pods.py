"""Trial pods as desired state: pure builders, no API calls (`executor` and `workers` apply them).

A pod runs `mergesearch-trial run --spec-env MERGESEARCH_TRIAL_SPEC`: the trial spec travels in an
environment variable of the pod itself, so one create makes a run and the spec can never be out of step
with it (a plan is kilobytes; the builder refuses one near the object size limit). Credentials come from
Secret references, never values. With `spec.trial.reusePods`, a worker pod (`worker_pod`) runs
`mergesearch worker` instead, and its runs' specs come over HTTP (see `executors.worker`).
"""

from __future__ import annotations

import json
from typing import Any

from mergesearch_trial_runner.spec import TrialSpec

from ..executors.worker import PORT as WORKER_PORT
from ..executors.worker import TOKEN_ENV
from ..spec import API_GROUP, API_VERSION, KIND, Trial
from .settings import OperatorSettings

SPEC_ENV = "MERGESEARCH_TRIAL_SPEC"
TERMINATION_LOG = "/dev/termination-log"
CACHE_DIR = "/var/cache/mergesearch"
SCRATCH_DIR = "/scratch"
MAX_SPEC_BYTES = 512 * 1024  # well under the 1.5 MiB an object may take in etcd
LABEL_SEARCH = f"{API_GROUP}/search"
LABEL_TRIAL = f"{API_GROUP}/trial"
LABEL_RUNG = f"{API_GROUP}/rung"
LABEL_ROLE = f"{API_GROUP}/role"
ROLE_WORKER = "worker"
TOKEN_KEY = "token"
MANAGED_BY = {"app.kubernetes.io/managed-by": "mergesearch", "app.kubernetes.io/name": "mergesearch-trial"}
S3_KEYS = (
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_ENDPOINT_URL", True),
    ("AWS_REGION", True),
)


def trial_pod(
    *,
    spec: TrialSpec,
    search: str,
    namespace: str,
    owner_uid: str,
    trial: Trial,
    s3_secret: str,
    settings: OperatorSettings,
    trial_number: int | None,
    rung: int | None,
) -> dict[str, Any]:
    spec = spec.model_copy(update={"cache_dir": CACHE_DIR, "scratch_dir": SCRATCH_DIR, "result_file": None})
    payload = spec.model_dump_json(exclude_defaults=False)
    if len(payload.encode()) > MAX_SPEC_BYTES:
        raise ValueError(f"the trial spec of {spec.name} is {len(payload)} bytes, over {MAX_SPEC_BYTES}")
    labels = {**MANAGED_BY, LABEL_SEARCH: search}
    if trial_number is not None:
        labels[LABEL_TRIAL] = str(trial_number)
    if rung is not None:
        labels[LABEL_RUNG] = str(rung)
    env = [
        {"name": SPEC_ENV, "value": payload},
        {"name": "MERGESEARCH_TERMINATION_LOG", "value": TERMINATION_LOG},
        *_s3_env(s3_secret),
    ]
    body = _pod(spec.name, namespace, labels, search, owner_uid, trial, settings)
    body["spec"]["activeDeadlineSeconds"] = trial.timeout_seconds
    body["spec"]["containers"][0].update({"args": ["run", "--spec-env", SPEC_ENV], "env": env})
    return body


def worker_pod(
    *,
    name: str,
    search: str,
    namespace: str,
    owner_uid: str,
    trial: Trial,
    s3_secret: str,
    token_secret: str,
    settings: OperatorSettings,
) -> dict[str, Any]:
    """A long-lived trial pod that takes run after run from the operator (`mergesearch worker`).

    No deadline of its own: each run has one, kept by the worker. Its address is the pod's IP, which the
    container learns from the downward API and listens on."""
    labels = {**MANAGED_BY, LABEL_SEARCH: search, LABEL_ROLE: ROLE_WORKER}
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": token_secret, "key": TOKEN_KEY}}},
        *_s3_env(s3_secret),
    ]
    body = _pod(name, namespace, labels, search, owner_uid, trial, settings)
    body["spec"]["containers"][0].update(
        {
            "command": ["mergesearch"],
            "args": ["worker", "--backend", trial.backend, "--timeout-seconds", str(trial.timeout_seconds)],
            "env": env,
            "ports": [{"name": "runs", "containerPort": WORKER_PORT}],
            "readinessProbe": {"tcpSocket": {"port": WORKER_PORT}, "periodSeconds": 5},
        }
    )
    return body


def _s3_env(s3_secret: str) -> list[dict[str, Any]]:
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key, "optional": optional}}}
        for key, optional in S3_KEYS
    ]


def _pod(
    name: str,
    namespace: str,
    labels: dict[str, str],
    search: str,
    owner_uid: str,
    trial: Trial,
    settings: OperatorSettings,
) -> dict[str, Any]:
    """What every trial pod has: the trial's image, resources and placement, the weight cache and scratch
    volumes, a locked-down security context, and the search as its owner (deleted with it)."""
    cache_volume = trial.cache_volume or (
        {"hostPath": {"path": settings.cache_host_path, "type": "DirectoryOrCreate"}}
        if settings.cache_host_path
        else {"emptyDir": {}}
    )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.trial_uid,
            "runAsGroup": settings.trial_uid,
            "fsGroup": settings.trial_uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "trial",
                "image": trial.image or settings.trial_image,
                "command": ["mergesearch-trial"],
                "resources": trial.resources,
                "terminationMessagePath": TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [
                    {"name": "weight-cache", "mountPath": CACHE_DIR},
                    {"name": "scratch", "mountPath": SCRATCH_DIR},
                ],
            }
        ],
        "volumes": [{"name": "weight-cache", **cache_volume}, {"name": "scratch", "emptyDir": {}}],
    }
    if trial.node_selector:
        pod_spec["nodeSelector"] = dict(trial.node_selector)
    if trial.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in trial.tolerations]
    if trial.service_account_name:
        pod_spec["serviceAccountName"] = trial.service_account_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(search, owner_uid)],
        },
        "spec": pod_spec,
    }


def owner_reference(search: str, owner_uid: str) -> dict[str, Any]:
    """The search owns its pods and Secrets: Kubernetes deletes them with it."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": search,
        "uid": owner_uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_of(pod: dict[str, Any]) -> TrialSpec:
    """The trial spec a pod carries (for tools and tests)."""
    for var in pod["spec"]["containers"][0]["env"]:
        if var["name"] == SPEC_ENV:
            return TrialSpec.model_validate(json.loads(var["value"]))
    raise KeyError(SPEC_ENV)
