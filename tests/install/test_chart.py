"""The Helm chart, linted and rendered offline by Helm 4 (helm-python-sdk), its objects validated strictly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from mergesearch_operator.k8s.pods import trial_pod
from mergesearch_operator.k8s.runtime import parse_spec
from mergesearch_operator.k8s.settings import OperatorSettings
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import TrialSpec
from tests.install.dashboard import load_dashboard
from tests.install.tree import (
    CHART_CRD,
    MANIFESTS_CRD,
    InstallTree,
    key,
    of_kind,
    one,
    render_chart,
    required_rules,
    rule_triples,
    validate_strictly,
)

# Values a production install might use: every optional part on, every name changed.
CUSTOM = {
    "fullnameOverride": "ms-operator",
    "image": {"repository": "registry.example.org/ml/mergesearch-operator", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "watch": {"allNamespaces": True},
    "trial": {
        "image": {"repository": "registry.example.org/ml/mergesearch-trial", "tag": "0.1.0-rc1-cu13"},
        "weightCache": {"hostPath": "/mnt/nvme/mergesearch-cache"},
    },
    "storage": {"databaseSecret": "studies-postgres", "s3Secret": "minio-credentials"},
    "serviceAccount": {"name": "ms-operator-sa", "annotations": {"example.org/role": "mergesearch"}},
    "metrics": {
        "port": 9100,
        "service": {"annotations": {"example.org/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "15s"},
    },
    "alerts": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "searchStuck": {"after": "3h"}},
    "health": {"port": 8082},
    "grafanaDashboard": {
        "namespace": "monitoring",
        "labels": {"grafana_dashboard": "1", "team": "ml-platform"},
        "annotations": {"grafana_folder": "MergeSearch"},
    },
    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
    "extraEnv": [{"name": "MERGESEARCH_RECONCILE_SECONDS", "value": "10"}],
    "podAnnotations": {"example.org/owner": "ml-platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "control", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
}
MULTI_NAMESPACE = {"watch": {"namespaces": ["team-a", "team-b"]}}
SCENARIOS = {"default": None, "custom": CUSTOM, "multi-namespace": MULTI_NAMESPACE}


def _deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _deployment(objects)["spec"]["template"]["spec"]["containers"]
    return container


def _env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {var["name"]: var.get("value") for var in _container(objects)["env"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_is_clean(chart: Path, scenario: str):
    """`helm lint --strict` finds no warning or error (info such as "icon is recommended" is allowed)."""
    report = helm.lint(chart, SCENARIOS[scenario], strict=True, namespace="mergesearch")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid(chart: Path, scenario: str):
    """kubernetes-validate --strict accepts every object (CRD included) for Kubernetes 1.27 and 1.37; the
    ServiceMonitor, whose schema it lacks, is checked by test_service_monitor_selects_the_metrics_service, the
    PrometheusRule by test_alerts."""
    objects = render_chart(chart, SCENARIOS[scenario])
    unchecked = validate_strictly(objects)
    assert {kind for kind, _, _ in unchecked} <= {"ServiceMonitor", "PrometheusRule"}


def test_defaults_render_the_expected_objects(chart: Path):
    kinds = sorted(key(o) for o in render_chart(chart))
    assert kinds == [
        ("ConfigMap", "mergesearch", "mergesearch-dashboard"),
        ("CustomResourceDefinition", "", "mergesearches.mergesearch.io"),
        ("Deployment", "mergesearch", "mergesearch"),
        ("Role", "mergesearch", "mergesearch"),
        ("RoleBinding", "mergesearch", "mergesearch"),
        ("Service", "mergesearch", "mergesearch-metrics"),
        ("ServiceAccount", "mergesearch", "mergesearch"),
    ]


def test_the_operator_pod_is_locked_down(chart: Path):
    """Non-root, read-only root filesystem with an emptyDir /tmp, no privilege escalation, no capabilities,
    seccomp RuntimeDefault, resources set, one replica replaced (not rolled) on upgrade."""
    objects = render_chart(chart)
    deployment = _deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    container = _container(objects)
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["image"] == "ghcr.io/mergesearch/operator:0.1.0"


@pytest.mark.parametrize("scenario", ["default", "custom"])
def test_ports_probes_and_service_agree(chart: Path, scenario: str):
    """The ports the operator is told (--metrics-port, --health-port) are the container's, the probes hit
    /healthz on the health port and the Service forwards the metrics port."""
    values = SCENARIOS[scenario] or {}
    metrics_port = values.get("metrics", {}).get("port", 9090)
    health_port = values.get("health", {}).get("port", 8081)
    objects = render_chart(chart, values)
    container = _container(objects)
    args = container["args"]
    assert args[args.index("--metrics-port") + 1] == str(metrics_port)
    assert args[args.index("--health-port") + 1] == str(health_port)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": metrics_port, "health": health_port}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    (service_port,) = one(objects, "Service")["spec"]["ports"]
    assert service_port == {"name": "metrics", "port": metrics_port, "targetPort": "metrics", "protocol": "TCP"}


def test_search_defaults_reach_the_operator(chart: Path):
    """Secret names, trial image and the weight-cache hostPath become the operator's environment."""
    assert _env(render_chart(chart)) == {
        "MERGESEARCH_TRIAL_IMAGE": "ghcr.io/mergesearch/trial-runner:0.1.0",
        "MERGESEARCH_DATABASE_SECRET": "mergesearch-db",
        "MERGESEARCH_S3_SECRET": "mergesearch-s3",
    }
    assert _env(render_chart(chart, CUSTOM)) == {
        "MERGESEARCH_TRIAL_IMAGE": "registry.example.org/ml/mergesearch-trial:0.1.0-rc1-cu13",
        "MERGESEARCH_DATABASE_SECRET": "studies-postgres",
        "MERGESEARCH_S3_SECRET": "minio-credentials",
        "MERGESEARCH_CACHE_HOST_PATH": "/mnt/nvme/mergesearch-cache",
        "MERGESEARCH_RECONCILE_SECONDS": "10",
    }


def test_operator_settings_read_the_environment_the_chart_sets(chart: Path):
    """Each MERGESEARCH_* variable the chart sets is a field of the operator's settings (a typo would be
    ignored silently by pydantic-settings)."""
    fields = {f"MERGESEARCH_{name.upper()}" for name in OperatorSettings.model_fields}
    assert set(_env(render_chart(chart, CUSTOM))) <= fields


def _defaulted(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in where it has no such field, as the API server stores it."""
    if isinstance(value, dict):
        for name, field in schema.get("properties", {}).items():
            if name not in value and "default" in field:
                value[name] = json.loads(json.dumps(field["default"]))
            if name in value:
                _defaulted(field, value[name])
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                _defaulted(schema["additionalProperties"], item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _defaulted(schema["items"], item)
    return value


def test_the_trial_image_value_reaches_the_trial_pods_of_a_search_that_names_none(
    chart: Path, monkeypatch: pytest.MonkeyPatch
):
    """The chart's trial.image (an air-gapped cluster's own registry) runs the trials of a search that names no
    image: the chart gives it to the operator as MERGESEARCH_TRIAL_IMAGE, the CRD fills in no image of its
    own, and the operator's pod builder falls back to its setting."""
    objects = render_chart(chart, CUSTOM)
    for name, value in _env(objects).items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    (version,) = one(objects, "CustomResourceDefinition")["spec"]["versions"]
    spec = {
        "models": {"base": "s3://models/base", "experts": [{"name": "a", "uri": "s3://models/a"}]},
        "searchSpace": {"type": "LFS"},
        "objectives": [{"name": "t", "data": "s3://tasks/t.jsonl"}],
        "trial": {"backend": "vllm"},
    }
    stored = _defaulted(version["schema"]["openAPIV3Schema"], {"spec": spec})["spec"]
    assert "image" not in stored["trial"]
    plan = MergePlan.model_validate(
        {
            "models": {"base": "s3://models/base", "a": "s3://models/a"},
            "base_model": "base",
            "slices": [{"method": "linear", "sources": [{"model": "a", "layers": [0, 2], "params": {"weight": 1.0}}]}],
        }
    )
    pod = trial_pod(
        spec=TrialSpec(name="s-t0-r0", plan=plan, tasks=[{"name": "t", "data": "s3://tasks/t.jsonl"}], ranges={}),
        search="s",
        namespace="team-a",
        owner_uid="uid",
        trial=parse_spec("s", "team-a", stored).trial,
        s3_secret=settings.s3_secret,
        settings=settings,
        trial_number=0,
        rung=0,
    )
    assert pod["spec"]["containers"][0]["image"] == "registry.example.org/ml/mergesearch-trial:0.1.0-rc1-cu13"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_is_exactly_what_the_operator_declares(chart: Path, scenario: str):
    """The permissions granted, however grouped, are mergesearch_operator.k8s.permissions.RULES: no more,
    no less, no wildcards; each Role/ClusterRole is bound to the operator's ServiceAccount only."""
    objects = render_chart(chart, SCENARIOS[scenario])
    required = rule_triples(required_rules())
    roles = of_kind(objects, "Role") + of_kind(objects, "ClusterRole")
    assert roles
    for role in roles:
        granted = rule_triples(role["rules"])
        assert granted == required, (
            f"{key(role)}: missing {sorted(required - granted)}, not needed {sorted(granted - required)}"
        )
    service_account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding")
    assert sorted(
        (b["roleRef"]["kind"], b["roleRef"]["name"], b["metadata"].get("namespace")) for b in bindings
    ) == sorted((r["kind"], r["metadata"]["name"], r["metadata"].get("namespace")) for r in roles)
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account, "namespace": "mergesearch"}]


@pytest.mark.parametrize(
    ("values", "watched"),
    [(None, ["mergesearch"]), (MULTI_NAMESPACE, ["team-a", "team-b"]), ({"watch": {"allNamespaces": True}}, None)],
    ids=["release-namespace", "two-namespaces", "all-namespaces"],
)
def test_watched_namespaces_match_the_rbac(chart: Path, values: dict[str, Any] | None, watched: list[str] | None):
    """--namespace per watched namespace with a Role there, or --all-namespaces with a ClusterRole only."""
    objects = render_chart(chart, values)
    args = _container(objects)["args"]
    if watched is None:
        assert "--all-namespaces" in args and "--namespace" not in args
        assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")
        assert len(of_kind(objects, "ClusterRole")) == len(of_kind(objects, "ClusterRoleBinding")) == 1
        return
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, arg in enumerate(args) if arg == "--namespace"] == watched
    assert sorted(r["metadata"]["namespace"] for r in of_kind(objects, "Role")) == watched
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")


def test_service_monitor_selects_the_metrics_service(chart: Path):
    """Off by default. When on: selects the metrics Service by its labels, in its namespace, by port name,
    and keeps the operator's `namespace` label (honorLabels) that the dashboard filters by."""
    assert not of_kind(render_chart(chart), "ServiceMonitor")
    objects = render_chart(chart, CUSTOM)
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= _deployment(objects)["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "15s",
        "scrapeTimeout": "10s",
        "honorLabels": True,
    }
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "mergesearch"


def test_dashboard_config_map_carries_the_dashboard(chart: Path):
    """The ConfigMap holds the dashboard JSON byte for byte, labelled for the Grafana sidecar (configurable)."""
    dashboard_text = (chart / "dashboards" / "mergesearch.json").read_text()
    config_map = one(render_chart(chart), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {"mergesearch.json": dashboard_text}
    assert json.loads(config_map["data"]["mergesearch.json"]) == load_dashboard(
        chart / "dashboards" / "mergesearch.json"
    )

    custom = one(render_chart(chart, CUSTOM), "ConfigMap")
    assert custom["metadata"]["namespace"] == "monitoring"
    assert custom["metadata"]["labels"]["team"] == "ml-platform"
    assert custom["metadata"]["annotations"] == {"grafana_folder": "MergeSearch"}
    assert not of_kind(render_chart(chart, {"grafanaDashboard": {"enabled": False}}), "ConfigMap")


BAD_VALUES = {
    "port-as-string": ({"metrics": {"port": "9090"}}, "/metrics/port"),
    "port-out-of-range": ({"health": {"port": 70000}}, "/health/port"),
    "unknown-top-level-key": ({"replicaCount": 2}, "replicaCount"),
    "unknown-nested-key": ({"watch": {"namespace": "team-a"}}, "namespace"),
    "all-namespaces-and-a-list": ({"watch": {"allNamespaces": True, "namespaces": ["team-a"]}}, "/watch/namespaces"),
    "namespace-not-a-dns-label": ({"watch": {"namespaces": ["Team_A"]}}, "/watch/namespaces/0"),
    "label-value-not-a-string": ({"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}}, "grafana_dashboard"),
    "relative-cache-path": ({"trial": {"weightCache": {"hostPath": "cache"}}}, "/trial/weightCache/hostPath"),
    "secret-name-with-capitals": ({"storage": {"databaseSecret": "Postgres"}}, "/storage/databaseSecret"),
    "bad-pull-policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "bad-interval": ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "/metrics/serviceMonitor/interval"),
    "string-for-boolean": ({"rbac": {"create": "yes"}}, "/rbac/create"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart: Path, case: str):
    """values.schema.json fails the render (as it fails `helm install`) and names the offending key. (The
    defaults pass it: every object is `additionalProperties: false`, and the other tests render them.)"""
    values, where = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError) as caught:
        render_chart(chart, values)
    assert where in str(caught.value)


def test_chart_crd_is_the_manifests_crd(tree: InstallTree):
    """charts/mergesearch/crds/ holds a byte-identical copy of manifests/crd/ (Helm cannot read a file
    outside the chart, and a symlink breaks `helm package` on some platforms and Argo CD's checks)."""
    assert (tree.root / CHART_CRD).exists(), f"the chart has no CRD: cp {MANIFESTS_CRD} {CHART_CRD}"
    assert (tree.root / CHART_CRD).read_bytes() == (tree.root / MANIFESTS_CRD).read_bytes(), (
        f"{CHART_CRD} differs from {MANIFESTS_CRD}: cp {MANIFESTS_CRD} {CHART_CRD}"
    )


def test_chart_crd_has_the_agreed_shape(tree: InstallTree):
    """Group, version, kind, plural, short name, namespaced, status subresource, printer columns."""
    (crd,) = yaml.safe_load_all((tree.root / CHART_CRD).read_text())
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "mergesearches.mergesearch.io"
    assert spec["group"] == "mergesearch.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "MergeSearch" and spec["names"]["plural"] == "mergesearches"
    assert "ms" in spec["names"]["shortNames"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Phase", "Age"}


def test_packaged_chart_renders_the_same(chart: Path, tmp_path: Path):
    """`helm package` keeps what the templates read (.Files.Get of a file .helmignore dropped would render an
    empty dashboard without any error) and the CRD."""
    with helm.Chart.load(chart) as loaded:
        archive = Path(loaded.save(tmp_path))
    assert archive.name == "mergesearch-0.1.0.tgz"
    with helm.Chart.load_archive(archive.read_bytes()) as packaged:
        assert [c["name"] for c in packaged.crds] == [str(CHART_CRD.relative_to("charts/mergesearch"))]
        assert "dashboards/mergesearch.json" in {f["name"] for f in packaged.files}
    assert render_chart(archive, CUSTOM) == render_chart(chart, CUSTOM)
