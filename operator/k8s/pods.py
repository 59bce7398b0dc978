"""Trial pods as desired state: pure builders, no API calls (`executor` applies them).

A pod runs `mergesearch-trial run --spec-env MERGESEARCH_TRIAL_SPEC`: the trial spec travels in an
environment variable of the pod itself, so one create makes a run and the spec can never be out of step
with it (a plan is kilobytes; the builder refuses one near the object size limit). Credentials come from
Secret references, never values.
"""

from __future__ import annotations

import json
from typing import Any

from mergesearch_trial_runner.spec import TrialSpec

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
        *(
            {"name": key, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": key, "optional": optional}}}
            for key, optional in S3_KEYS
        ),
    ]
    cache_volume = trial.cache_volume or (
        {"hostPath": {"path": settings.cache_host_path, "type": "DirectoryOrCreate"}}
        if settings.cache_host_path
        else {"emptyDir": {}}
    )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": trial.timeout_seconds,
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
                "args": ["run", "--spec-env", SPEC_ENV],
                "env": env,
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
            "name": spec.name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": KIND,
                    "name": search,
                    "uid": owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }


def spec_of(pod: dict[str, Any]) -> TrialSpec:
    """The trial spec a pod carries (for tools and tests)."""
    for var in pod["spec"]["containers"][0]["env"]:
        if var["name"] == SPEC_ENV:
            return TrialSpec.model_validate(json.loads(var["value"]))
    raise KeyError(SPEC_ENV)
