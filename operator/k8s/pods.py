"""Trial pods as desired state: pure builders, no API calls (`executor` and `workers` apply them).

A pod runs `mergesearch-trial run --spec-env MERGESEARCH_TRIAL_SPEC`: the trial spec travels in an
environment variable of the pod itself, so one create makes a run and the spec can never be out of step
with it (a plan is kilobytes; the builder refuses one near the object size limit). Credentials come from
Secret references, never values. With `spec.trial.reusePods`, a worker pod (`worker_pod`) runs
`mergesearch worker` instead, and its runs' specs come over HTTP (see `executors.worker`). The search's
pod template (`spec.trial`: pull secrets, affinity, classes, env, volumes, labels, annotations) adds to
every trial pod; the labels, variables, volumes and paths the operator keeps are named in `podtemplate`.
"""

from __future__ import annotations

import json
from typing import Any

from mergesearch_trial_runner.spec import TrialSpec

from ..executors.worker import PORT as WORKER_PORT
from ..executors.worker import TOKEN_ENV
from ..podtemplate import (
    CACHE_DIR,
    CACHE_HOME_ENV,
    CACHE_VOLUME,
    POD_IP_ENV,
    S3_ENV,
    SCRATCH_DIR,
    SCRATCH_VOLUME,
    SPEC_ENV,
    TERMINATION_LOG,
    TERMINATION_LOG_ENV,
)
from ..spec import API_GROUP, API_VERSION, KIND, Trial
from .settings import OperatorSettings

MAX_SPEC_BYTES = 512 * 1024  # well under the 1.5 MiB an object may take in etcd
LABEL_SEARCH = f"{API_GROUP}/search"
LABEL_TRIAL = f"{API_GROUP}/trial"
LABEL_RUNG = f"{API_GROUP}/rung"
LABEL_ROLE = f"{API_GROUP}/role"
ROLE_WORKER = "worker"
TOKEN_KEY = "token"
MANAGED_BY = {"app.kubernetes.io/managed-by": "mergesearch", "app.kubernetes.io/name": "mergesearch-trial"}
S3_OPTIONAL = frozenset({"AWS_ENDPOINT_URL", "AWS_REGION"})


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
        {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG},
        *_s3_env(s3_secret),
    ]
    body = _pod(spec.name, namespace, labels, search, owner_uid, trial, settings)
    body["spec"]["activeDeadlineSeconds"] = trial.timeout_seconds
    body["spec"]["containers"][0]["args"] = ["run", "--spec-env", SPEC_ENV]
    body["spec"]["containers"][0]["env"] = env + body["spec"]["containers"][0]["env"]
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
        {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": token_secret, "key": TOKEN_KEY}}},
        *_s3_env(s3_secret),
    ]
    body = _pod(name, namespace, labels, search, owner_uid, trial, settings)
    body["spec"]["containers"][0].update(
        {
            "command": ["mergesearch"],
            "args": ["worker", "--backend", trial.backend, "--timeout-seconds", str(trial.timeout_seconds)],
            "env": env + body["spec"]["containers"][0]["env"],
            "ports": [{"name": "runs", "containerPort": WORKER_PORT}],
            "readinessProbe": {"tcpSocket": {"port": WORKER_PORT}, "periodSeconds": 5},
        }
    )
    return body


def _s3_env(s3_secret: str) -> list[dict[str, Any]]:
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key, "optional": key in S3_OPTIONAL}}}
        for key in S3_ENV
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
    volumes, a locked-down security context, the search as its owner (deleted with it), and the search's
    pod template (`spec.trial`: pull secrets, affinity, classes, extra env, volumes, labels, annotations),
    which adds to the operator's parts and never replaces them (the manifest's validation refuses that).
    The callers put their own variables before the template's `env`."""
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
                "env": [{"name": CACHE_HOME_ENV, "value": CACHE_DIR}, *(var.to_k8s() for var in trial.env)],
                "volumeMounts": [
                    {"name": CACHE_VOLUME, "mountPath": CACHE_DIR},
                    {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR},
                    *(mount.to_k8s() for mount in trial.volume_mounts),
                ],
            }
        ],
        "volumes": [
            {"name": CACHE_VOLUME, **cache_volume},
            {"name": SCRATCH_VOLUME, "emptyDir": {}},
            *(volume.to_k8s() for volume in trial.volumes),
        ],
    }
    if trial.node_selector:
        pod_spec["nodeSelector"] = dict(trial.node_selector)
    if trial.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in trial.tolerations]
    if trial.service_account_name:
        pod_spec["serviceAccountName"] = trial.service_account_name
    if trial.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": ref.name} for ref in trial.image_pull_secrets]
    if trial.affinity is not None:
        pod_spec["affinity"] = trial.affinity.to_k8s()
    if trial.priority_class_name:
        pod_spec["priorityClassName"] = trial.priority_class_name
    if trial.runtime_class_name:
        pod_spec["runtimeClassName"] = trial.runtime_class_name
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**trial.labels, **labels},  # the operator's last: they win, should validation ever miss one
        "ownerReferences": [owner_reference(search, owner_uid)],
    }
    if trial.annotations:
        metadata["annotations"] = dict(trial.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
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
