"""The search's pod template (`spec.trial`): what it adds to trial and worker pods, and what it may not touch."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergesearch_operator import podtemplate
from mergesearch_operator.executors import worker
from mergesearch_operator.k8s.pods import LABEL_SEARCH, MANAGED_BY, SPEC_ENV, trial_pod, worker_pod
from mergesearch_operator.k8s.settings import OperatorSettings
from mergesearch_operator.spec import ManifestError, Trial, parse_manifest
from tests.cluster.fakes import spec

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "lfs-single-objective.yaml"
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]
        }
    },
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 50,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mergesearch-trial"}},
                },
            }
        ]
    },
}
TEMPLATE: dict[str, Any] = {
    "imagePullSecrets": [{"name": "regcred"}],
    "affinity": AFFINITY,
    "priorityClassName": "batch-low",
    "runtimeClassName": "nvidia",
    "env": [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ],
    "volumes": [
        {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
    ],
    "volumeMounts": [
        {"name": "models", "mountPath": "/models", "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
    ],
    "labels": {"team": "research", "example.com/cost-center": "ml-42"},
    "annotations": {"sidecar.istio.io/inject": "false", "mergesearch.example/note": "any text, even spaces"},
}


def build(kind: str, trial: Trial) -> dict[str, Any]:
    common = {
        "search": "s",
        "namespace": "ns",
        "owner_uid": "uid-1",
        "trial": trial,
        "s3_secret": "creds",
        "settings": OperatorSettings(),
    }
    if kind == "trial":
        return trial_pod(spec=spec(), trial_number=3, rung=1, **common)
    return worker_pod(name="s-w0", token_secret="s-worker-token", **common)


@pytest.mark.parametrize("kind", ["trial", "worker"])
def test_the_template_reaches_the_pod_beside_the_operators_parts(kind):
    bare = build(kind, Trial())
    pod = build(kind, Trial.model_validate(TEMPLATE))
    meta, body = pod["metadata"], pod["spec"]
    container = body["containers"][0]
    assert body["imagePullSecrets"] == [{"name": "regcred"}]
    assert body["affinity"] == AFFINITY
    assert body["priorityClassName"] == "batch-low" and body["runtimeClassName"] == "nvidia"
    assert meta["labels"] == {**bare["metadata"]["labels"], **TEMPLATE["labels"]}
    assert meta["annotations"] == TEMPLATE["annotations"]
    # the operator's variables first, then the template's, each once
    assert container["env"] == bare["spec"]["containers"][0]["env"] + TEMPLATE["env"]
    assert body["volumes"] == bare["spec"]["volumes"] + TEMPLATE["volumes"]
    assert container["volumeMounts"] == bare["spec"]["containers"][0]["volumeMounts"] + TEMPLATE["volumeMounts"]
    for key in ("imagePullSecrets", "affinity", "priorityClassName", "runtimeClassName"):
        assert key not in bare["spec"]  # an empty template adds nothing
    assert "annotations" not in bare["metadata"] and bare["spec"]["containers"][0]["env"]


def test_everything_the_operator_sets_on_a_pod_is_kept_from_the_template():
    """The reserved names in `podtemplate` are the ones the pod builders use (a drift check)."""
    assert worker.TOKEN_ENV == podtemplate.TOKEN_ENV and SPEC_ENV == podtemplate.SPEC_ENV
    for kind in ("trial", "worker"):
        pod = build(kind, Trial())
        container = pod["spec"]["containers"][0]
        assert {v["name"] for v in container["env"]} <= set(podtemplate.OPERATOR_ENV)
        assert {v["name"] for v in pod["spec"]["volumes"]} == set(podtemplate.OPERATOR_VOLUMES)
        paths = {m["mountPath"] for m in container["volumeMounts"]} | {container["terminationMessagePath"]}
        assert paths == set(podtemplate.OPERATOR_PATHS)
        for key in pod["metadata"]["labels"]:
            assert key in MANAGED_BY or key.startswith(podtemplate.OPERATOR_PREFIX), key
    assert LABEL_SEARCH.startswith(podtemplate.OPERATOR_PREFIX)


def manifest_with(**trial: Any) -> dict[str, Any]:
    document = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    document["spec"].setdefault("trial", {}).update(trial)
    return document


def test_a_manifest_with_the_whole_template_parses():
    parsed = parse_manifest(manifest_with(**TEMPLATE)).spec.trial
    assert [m.mount_path for m in parsed.volume_mounts] == ["/models", "/dev/shm"]
    assert parsed.volumes[0].to_k8s() == TEMPLATE["volumes"][0]  # the source as written, camelCase kept


@pytest.mark.parametrize(
    ("trial", "field", "message"),
    [
        (
            {"env": [{"name": "MERGESEARCH_TRIAL_SPEC", "value": "{}"}]},
            "spec.trial.env",
            "MERGESEARCH_TRIAL_SPEC is set",
        ),
        (
            {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}, {"name": "POD_IP", "value": "x"}]},
            "spec.trial.env",
            "AWS_SECRET_ACCESS_KEY, POD_IP are set by the operator",
        ),
        ({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, "spec.trial.env", "A appears more"),
        (
            {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]},
            "spec.trial.env[0]",
            "A: give value or valueFrom, not both",
        ),
        ({"env": [{"value": "1"}]}, "spec.trial.env[0].name", "required"),
        (
            {"labels": {"mergesearch.io/search": "other"}},
            "spec.trial.labels",
            "mergesearch.io/search is the operator's",
        ),
        (
            {"labels": {"app.kubernetes.io/managed-by": "helm"}},
            "spec.trial.labels",
            "app.kubernetes.io/managed-by is the operator's own label",
        ),
        ({"labels": {"team": "r&d"}}, "spec.trial.labels", "the value of label team"),
        ({"labels": {"-bad": "x"}}, "spec.trial.labels", "'-bad' is not a valid label key"),
        ({"annotations": {"mergesearch.io/x": "y"}}, "spec.trial.annotations", "mergesearch.io/x is the operator's"),
        ({"volumes": [{"name": "scratch", "emptyDir": {}}]}, "spec.trial.volumes", "scratch is the operator's own"),
        ({"volumes": [{"name": "models"}]}, "spec.trial.volumes[0]", "volume models has no source"),
        (
            {"volumes": [{"name": "m", "emptyDir": {}}], "volumeMounts": [{"name": "weight-cache", "mountPath": "/c"}]},
            "spec.trial.volumeMounts",
            "mounts volume weight-cache, which trial.volumes does not define",
        ),
        (
            {"volumes": [{"name": "m", "emptyDir": {}}], "volumeMounts": [{"name": "m", "mountPath": "/scratch/"}]},
            "spec.trial.volumeMounts",
            "/scratch is where the operator mounts its own",
        ),
        ({"volumeMounts": [{"name": "m", "mountPath": "relative"}]}, "spec.trial.volumeMounts[0].mountPath", "match"),
        ({"imagePullSecrets": ["regcred"]}, "spec.trial.imagePullSecrets[0]", "valid dictionary"),
        ({"affinity": {"nodeAfinity": {}}}, "spec.trial.affinity.nodeAfinity", "unknown field"),
        ({"priorityClassName": "Low_Priority"}, "spec.trial.priorityClassName", "match"),
    ],
)
def test_a_template_that_would_replace_the_operators_parts_is_refused(trial, field, message):
    with pytest.raises(ManifestError) as error:
        parse_manifest(manifest_with(**trial))
    assert error.value.field == field and message in str(error.value), str(error.value)
