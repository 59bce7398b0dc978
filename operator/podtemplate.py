"""What a search adds to its trial pods (`spec.trial`'s pod template), and what the operator keeps.

Cluster admins configure trial pods as they configure any workload: pull secrets, affinity, priority and
runtime classes, extra environment variables, volumes and mounts, labels and annotations, all in the
shapes `kubectl` users know. The operator's own parts of a trial pod stay its own: the labels it finds
its pods by, the variables the trial runner reads, the volumes it mounts. A template that would replace
one is refused when the manifest is parsed, naming the field and the name, instead of building a pod
that loses track of its run. The names live here rather than in `k8s.pods` (which builds pods with
them) because the manifest's validation knows nothing of Kubernetes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

OPERATOR_PREFIX = "mergesearch.io/"  # the API group: every label and annotation under it is the operator's
OPERATOR_LABELS = ("app.kubernetes.io/managed-by", "app.kubernetes.io/name")  # and the group's own
SPEC_ENV = "MERGESEARCH_TRIAL_SPEC"
TERMINATION_LOG_ENV = "MERGESEARCH_TERMINATION_LOG"
TOKEN_ENV = "MERGESEARCH_WORKER_TOKEN"  # executors.worker reads it (kept equal by a test)
POD_IP_ENV = "POD_IP"
CACHE_HOME_ENV = "XDG_CACHE_HOME"  # caches that follow XDG (lm-eval's task index) go to the node's cache
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")
OPERATOR_ENV = (SPEC_ENV, TERMINATION_LOG_ENV, TOKEN_ENV, POD_IP_ENV, CACHE_HOME_ENV, *S3_ENV)
CACHE_VOLUME, SCRATCH_VOLUME = "weight-cache", "scratch"
CACHE_DIR, SCRATCH_DIR, TERMINATION_LOG = "/var/cache/mergesearch", "/scratch", "/dev/termination-log"
OPERATOR_VOLUMES = (CACHE_VOLUME, SCRATCH_VOLUME)
OPERATOR_PATHS = (CACHE_DIR, SCRATCH_DIR, TERMINATION_LOG)

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$")
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Template(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        populate_by_name=True,
    )

    def to_k8s(self) -> dict[str, Any]:
        """The object as the pod spec wants it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class EnvVar(_Template):
    """A Kubernetes EnvVar: a literal `value` or a `valueFrom` reference."""

    name: str = Field(
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
        description="the variable's name; the operator's own (MERGESEARCH_TRIAL_SPEC, MERGESEARCH_TERMINATION_LOG, "
        "MERGESEARCH_WORKER_TOKEN, POD_IP, AWS_*) cannot be set",
    )
    value: str | None = Field(default=None, description="the literal value")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="a Kubernetes EnvVarSource: secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef",
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"{self.name}: give value or valueFrom, not both")
        return self


class VolumeMount(_Template):
    """A Kubernetes VolumeMount of one of `trial.volumes` into the trial container."""

    name: str = Field(description="the volume to mount: one of trial.volumes")
    mount_path: str = Field(
        pattern=r"^/",
        description=f"where in the container (absolute); not the operator's own {', '.join(OPERATOR_PATHS)}",
    )
    read_only: bool | None = Field(default=None, description="mount read-only")
    sub_path: str | None = Field(default=None, description="mount this path inside the volume instead of its root")
    sub_path_expr: str | None = Field(default=None, description="subPath with $(VAR) expanded from the env")
    mount_propagation: Literal["None", "HostToContainer", "Bidirectional"] | None = Field(
        default=None, description="how mounts propagate between host and container"
    )


class Volume(_Template):
    """A Kubernetes Volume: a name and one volume source, written as in a pod spec."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    name: str = Field(
        pattern=DNS_LABEL,
        max_length=63,
        description="the volume's name, which volumeMounts refer to; not the operator's own "
        f"({', '.join(OPERATOR_VOLUMES)})",
    )

    @model_validator(mode="after")
    def _source(self) -> Volume:
        if not self.model_extra:
            raise ValueError(
                f"volume {self.name} has no source; give one as in a pod spec, e.g. "
                "persistentVolumeClaim: {claimName: models}"
            )
        return self


class Affinity(_Template):
    """A Kubernetes Affinity: node affinity, pod affinity and pod anti-affinity, as in a pod spec."""

    node_affinity: dict[str, Any] | None = Field(default=None, description="a Kubernetes NodeAffinity")
    pod_affinity: dict[str, Any] | None = Field(default=None, description="a Kubernetes PodAffinity")
    pod_anti_affinity: dict[str, Any] | None = Field(default=None, description="a Kubernetes PodAntiAffinity")


def check_metadata(field: str, values: Mapping[str, str]) -> Mapping[str, str]:
    """Labels or annotations: well-formed keys (and label values), none of the operator's."""
    for key, value in values.items():
        if key.startswith(OPERATOR_PREFIX) or key in OPERATOR_LABELS:
            raise ValueError(
                f"{key} is the operator's own {field[:-1]} (it keeps {OPERATOR_PREFIX}* and "
                f"{', '.join(OPERATOR_LABELS)}); use another key"
            )
        name = key.rsplit("/", 1)[-1]
        if not _KEY.match(key) or len(name) > 63 or len(key) - len(name) > 254:
            raise ValueError(
                f"{key!r} is not a valid {field[:-1]} key: an optional DNS prefix and '/', then up to 63 "
                "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            )
        if field == "labels" and (len(value) > 63 or not _LABEL_VALUE.match(value)):
            raise ValueError(
                f"the value of label {key} ({value!r}) must be up to 63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit"
            )
    return values


def check_env(env: list[EnvVar]) -> list[EnvVar]:
    """No variable of the operator's, none twice."""
    names = [var.name for var in env]
    taken = sorted(set(names) & set(OPERATOR_ENV))
    if taken:
        raise ValueError(
            f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} set by the operator; use another name"
        )
    _unique("env", names)
    return env


def check_volumes(volumes: list[Volume]) -> list[Volume]:
    names = [volume.name for volume in volumes]
    taken = sorted(set(names) & set(OPERATOR_VOLUMES))
    if taken:
        raise ValueError(f"{', '.join(taken)} is the operator's own volume name; rename the volume")
    _unique("volumes", names)
    return volumes


def check_mounts(mounts: list[VolumeMount], volumes: Iterable[Volume]) -> list[VolumeMount]:
    """Each mount names one of the template's volumes, at a path of its own."""
    defined = {volume.name for volume in volumes}
    for index, mount in enumerate(mounts):
        if mount.name not in defined:
            raise ValueError(
                f"volumeMounts[{index}] mounts volume {mount.name}, which trial.volumes does not define"
                + (
                    " (the operator's volumes are not the template's to mount)"
                    if mount.name in OPERATOR_VOLUMES
                    else ""
                )
            )
        path = mount.mount_path.rstrip("/") or "/"
        if path in OPERATOR_PATHS:
            raise ValueError(f"volumeMounts[{index}]: {path} is where the operator mounts its own; use another path")
    _unique("volumeMounts' mountPath", [m.mount_path.rstrip("/") for m in mounts])
    return mounts


def _unique(field: str, names: list[str]) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{field}: {', '.join(twice)} appear{'s' if len(twice) == 1 else ''} more than once")
