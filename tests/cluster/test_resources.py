"""The CRD, the trial pod and the Kubernetes executor's reading of pod states, without a cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergesearch_operator.k8s.crd import crd_yaml, custom_resource_definition
from mergesearch_operator.k8s.executor import KubernetesExecutor, PodView
from mergesearch_operator.k8s.pods import LABEL_SEARCH, SPEC_ENV, spec_of, trial_pod
from mergesearch_operator.k8s.settings import OperatorSettings
from mergesearch_operator.k8s.status import search_status
from mergesearch_operator.search.controller import Best, SearchStatus
from mergesearch_operator.spec import Trial
from mergesearch_trial_runner.spec import TrialResult
from tests.cluster.fakes import RecordingApi, spec

ROOT = Path(__file__).resolve().parents[2]


def test_the_crd_file_is_generated_from_the_schema():
    on_disk = (ROOT / "manifests" / "crd" / "mergesearches.mergesearch.io.yaml").read_text()
    assert on_disk == crd_yaml(), "run: mergesearch crd > manifests/crd/mergesearches.mergesearch.io.yaml"


def test_the_crd_is_structural():
    schema = custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = json.dumps(schema)
    assert "$ref" not in text and "anyOf" not in text and "oneOf" not in text and '"const"' not in text
    space = schema["properties"]["spec"]["properties"]["searchSpace"]
    assert space["properties"]["type"]["enum"] == ["LFS", "DIS"] and space["required"] == ["type"]
    budget = schema["properties"]["spec"]["properties"]["budget"]["properties"]
    assert budget["parallelTrials"]["minimum"] == 1 and budget["maxTrials"]["default"] == 100


def test_the_crd_gives_no_search_space_a_default_of_another_type():
    """The API server applies a default wherever the field is absent: DIS's scaleRange would reach LFS spaces,
    which refuse it. Neither variant's own fields carry a default in the merged schema."""
    schema = custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    space = schema["properties"]["spec"]["properties"]["searchSpace"]["properties"]
    assert not [name for name, prop in space.items() if "default" in prop]


def test_the_trial_pod():
    trial = Trial(
        timeout_seconds=900,
        node_selector={"gpu": "h100"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
        service_account_name="trials",
    )
    pod = trial_pod(
        spec=spec(),
        search="s",
        namespace="ns",
        owner_uid="uid-1",
        trial=trial,
        s3_secret="creds",
        settings=OperatorSettings(cache_host_path="/var/cache/ms"),
        trial_number=3,
        rung=1,
    )
    meta, body = pod["metadata"], pod["spec"]
    assert meta["name"] == "s-t3-r1" and meta["labels"][LABEL_SEARCH] == "s"
    assert meta["ownerReferences"][0] == {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "name": "s",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert body["activeDeadlineSeconds"] == 900 and body["restartPolicy"] == "Never"
    assert body["nodeSelector"] == {"gpu": "h100"} and body["serviceAccountName"] == "trials"
    assert body["securityContext"]["runAsNonRoot"] is True
    container = body["containers"][0]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert container["command"] == ["mergesearch-trial"] and container["args"] == ["run", "--spec-env", SPEC_ENV]
    secrets = [v for v in container["env"] if "valueFrom" in v]
    assert secrets and all(v["valueFrom"]["secretKeyRef"]["name"] == "creds" for v in secrets)
    assert not any("value" in v and v["name"].startswith("AWS_") for v in container["env"])  # no secret values
    assert {"name": "weight-cache", "hostPath": {"path": "/var/cache/ms", "type": "DirectoryOrCreate"}} in body[
        "volumes"
    ]
    assert spec_of(pod).plan == spec().plan and spec_of(pod).cache_dir == "/var/cache/mergesearch"


def executor(now: float = 1000.0) -> tuple[KubernetesExecutor, RecordingApi]:
    api = RecordingApi()
    settings = OperatorSettings(unschedulable_seconds=60, image_pull_seconds=30, keep_failed_pods=1)
    ex = KubernetesExecutor(
        api=api,
        search="s",
        namespace="ns",
        owner_uid="u",
        trial=Trial(),
        s3_secret="x",
        settings=settings,
        clock=lambda: now,
    )
    return ex, api


def pod(name="s-t3-r1", phase="Running", created=900.0, **extra) -> PodView:
    return PodView(name=name, phase=phase, created=created, **extra)


def ok_message() -> str:
    return TrialResult(name="s-t3-r1", ok=True, tasks={"t": {"correct": 3, "evaluated": 10}}).compact_json()


def test_a_pod_is_created_once_and_counts_as_running_before_the_watch_sees_it():
    ex, api = executor()
    ex.start(spec())
    ex.start(spec())
    assert api.created == ["s-t3-r1"] and ex.poll("s-t3-r1").phase == "Running"
    ex.observe({"s-t3-r1": pod()})
    ex.start(spec())
    assert api.created == ["s-t3-r1"]


def test_a_run_cancelled_before_the_watch_showed_its_pod_is_let_go():
    ex, api = executor()
    ex.start(spec())
    ex.cancel("s-t3-r1")
    ex.observe({})  # the watch saw the pod come and go between two looks, or not at all
    assert api.deleted == ["s-t3-r1"]
    assert ex.poll("s-t3-r1").phase == "Missing" and list(ex.held()) == []


@pytest.mark.parametrize(
    ("view", "phase", "failure", "cause"),
    [
        (pod(phase="Succeeded", message="logs\n" + ok_message(), started=1.0, finished=11.0), "Succeeded", None, ""),
        (pod(phase="Failed", reason="DeadlineExceeded"), "Failed", "infrastructure", "DeadlineExceeded"),
        (pod(phase="Failed", terminated_reason="OOMKilled", exit_code=137), "Failed", "infrastructure", "OOMKilled"),
        (pod(phase="Failed", exit_code=65, message="bad task file"), "Failed", "user", "UserError"),
        (pod(phase="Failed", exit_code=1, message="Traceback..."), "Failed", "infrastructure", "Error"),
        (pod(phase="Pending", waiting_reason="ImagePullBackOff", created=900.0), "Failed", "user", "ImagePull"),
        (pod(phase="Pending", waiting_reason="ImagePullBackOff", created=990.0), "Running", None, ""),
        (pod(phase="Pending", unschedulable=True, created=900.0), "Failed", "infrastructure", "Unschedulable"),
        (pod(phase="Pending", unschedulable=True, created=990.0), "Running", None, ""),
        (pod(phase="Running", deleting=True), "Failed", "infrastructure", "Lost"),
    ],
)
def test_pod_states_become_run_outcomes(view, phase, failure, cause):
    ex, _ = executor()
    ex.observe({view.name: view})
    status = ex.poll(view.name)
    assert (status.phase, status.failure, status.cause) == (phase, failure, cause)
    if phase == "Succeeded":
        assert status.result.tasks["t"].correct == 3 and status.seconds == 10.0


def test_an_image_pull_failure_names_the_image_the_pod_runs():
    ex, _ = executor()  # its Trial() names no image: the pod runs the operator's
    ex.observe({"s-t3-r1": pod(phase="Pending", waiting_reason="ImagePullBackOff", created=900.0)})
    assert ex.poll("s-t3-r1").reason == f"cannot pull image {OperatorSettings().trial_image}: ImagePullBackOff"


def test_pods_from_the_watch_are_read_from_their_status():
    body = {
        "metadata": {"name": "s-t1-r0", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "OOMKilled",
                            "startedAt": "2026-01-01T00:00:05Z",
                            "finishedAt": "2026-01-01T00:01:05Z",
                        }
                    }
                }
            ],
        },
    }
    view = PodView.from_body(body)
    assert (view.phase, view.exit_code, view.terminated_reason) == ("Failed", 137, "OOMKilled")
    assert view.finished - view.started == 60


def test_release_keeps_the_newest_failed_pods():
    ex, api = executor()
    ex.observe(
        {
            "old": pod(name="old", phase="Failed", created=1.0),
            "new": pod(name="new", phase="Failed", created=2.0),
            "done": pod(name="done", phase="Succeeded", created=3.0),
        }
    )
    ex.release("done")
    ex.release("new")
    assert api.deleted == ["done", "old"]


def test_status_is_small_whatever_the_number_of_trials():
    status = SearchStatus(
        phase="Running",
        trials={"running": 64, "completed": 5000, "pruned": 90000, "failed": 3, "skipped": 0},
        rungs=[90000, 30000, 10000],
        running_per_rung=[40, 20, 4],
        budgets=[100, 300, 1000],
        best=Best(trial=123, value=0.61, objectives={f"task{i}": 0.5 for i in range(8)}),
        front=[{"trial": i, "objectives": {f"task{j}": 0.5 for j in range(8)}} for i in range(10)],
        final={f"expert:e{i}": {f"task{j}": 0.5 for j in range(8)} for i in range(40)},
    )
    body = search_status(status, generation=3, conditions=[])
    assert len(json.dumps(body)) < 16 * 1024
    assert len(body["heldOut"]) <= 24 and body["observedGeneration"] == 3


def test_a_sweep_deletes_the_pods_of_runs_that_are_not_live():
    """What a restarted operator finds: pods of finished, superseded or unknown runs, beside live ones."""
    ex, api = executor()
    result = '{"name": "s-t1-r0", "ok": true, "tasks": {}}'
    ex.observe(
        {
            "s-t0-r1": pod("s-t0-r1"),  # live: its trial's current run
            "s-t1-r0": pod("s-t1-r0", phase="Succeeded", message=result),  # decided, delete never sent
            "s-t2-r0": pod("s-t2-r0", phase="Failed", created=800.0),  # superseded by its retry -a1
            "s-t3-r0": pod("s-t3-r0", phase="Failed", created=850.0),  # superseded too, the newer failure
            "s-t4-r0": pod("s-t4-r0", phase="Running", deleting=True),  # already being deleted
            "s-t9-r2": pod("s-t9-r2"),  # a run the study does not know, still running
        }
    )
    ex.start(spec("s-t2-r0-a1"))  # created this reconcile, not yet seen by the watch
    ex.sweep({"s-t0-r1", "s-t2-r0-a1"})
    # the newest failure stays for debugging (keep_failed_pods=1); nothing live, nothing deleting is touched
    assert sorted(api.deleted) == ["s-t1-r0", "s-t2-r0", "s-t9-r2"]
    api.deleted.clear()
    ex.sweep({"s-t0-r1", "s-t2-r0-a1"})  # the watch has not seen them go yet: nothing is asked twice
    assert api.deleted == []
    restarted, api = executor()  # a restarted operator has not sent those deletes: it sends them
    restarted.observe({"s-t1-r0": pod("s-t1-r0", phase="Succeeded", message=result), "s-t0-r1": pod("s-t0-r1")})
    restarted.sweep({"s-t0-r1"})
    assert api.deleted == ["s-t1-r0"]


def test_the_docs_reference_is_generated_from_the_schema():
    from mergesearch_operator.reference import END, START, reference_markdown

    page = (ROOT / "docs" / "reference.md").read_text()
    current = page.split(START, 1)[1].split(END, 1)[0].strip()
    assert current == reference_markdown(), "run: make docs"
    # defaults made by factories, which the schema leaves out, are shown too
    assert '| `trial.resources` | object | `{"limits": {"nvidia.com/gpu": 1}}` |' in current
