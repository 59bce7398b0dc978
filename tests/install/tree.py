"""The install tree (chart and manifests), rendered and built the way a user would, and validated.

The tree is the repository itself: `manifests/crd/` holds the CRD generated from the schema (see
`tests/cluster/test_resources.py`), and the chart a copy of it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = "mergesearches.mergesearch.io.yaml"
MANIFESTS_CRD = Path("manifests/crd") / CRD_FILE
CHART_CRD = Path("charts/mergesearch/crds") / CRD_FILE
CHART_DASHBOARD = Path("charts/mergesearch/dashboards/mergesearch.json")
BASE_DASHBOARD = Path("manifests/base/dashboards/mergesearch.json")
RELEASE = "mergesearch"
NAMESPACE = "mergesearch"  # the overlays' namespace, and the release namespace they are compared with
# Kubernetes versions the objects must be valid for: the chart's kubeVersion floor and the newest known.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
# Kinds of other projects, whose schemas kubernetes-validate does not ship; tests check them otherwise.
FOREIGN_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),  # prometheus-operator: structural checks in test_chart
    ("monitoring.coreos.com/v1", "PrometheusRule"),  # prometheus-operator: promtool and Prometheus in test_alerts
    ("argoproj.io/v1alpha1", "Application"),  # Argo CD: paths and namespaces checked in test_kustomize
    ("mergesearch.io/v1alpha1", "MergeSearch"),  # ours: parse_manifest and the CRD's schema in test_examples
}
# Labels only Helm adds; everything else must be equal between a chart render and a kustomize build.
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


@dataclass(frozen=True)
class InstallTree:
    """Where the chart and the manifests to test are."""

    root: Path

    @property
    def chart(self) -> Path:
        return self.root / "charts" / "mergesearch"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_chart(
    chart: Path, values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """`helm template --include-crds`, offline: the CRDs from crds/ and every rendered object (not NOTES.txt).
    Raises helm_python.HelmValuesError for values the schema rejects, HelmRenderError for template errors."""
    import helm_python as helm

    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values, name=release, namespace=namespace, is_install=True)
        crds = loaded.crds
    objects: list[dict[str, Any]] = []
    for crd in crds:
        objects += documents(crd["data"])
    for path in sorted(rendered):
        if not path.endswith("NOTES.txt"):
            objects += documents(rendered[path])
    return objects


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH` (offline); fails the test with kustomize's message on an error."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not installed (it ships with the machine image; `kubectl kustomize` is offline)")
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return documents(result.stdout)


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    """Kind, namespace and name: what identifies an object in a cluster (apiVersion aside)."""
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def by_key(objects: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    indexed: dict[tuple[str, str, str], dict[str, Any]] = {}
    for obj in objects:
        assert key(obj) not in indexed, f"{key(obj)} appears twice"
        indexed[key(obj)] = obj
    return indexed


def of_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {[key(o) for o in found]}"
    return found[0]


def validate_strictly(objects: Iterable[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Validate every object with kubernetes-validate (strict: unknown fields are errors) for each version in
    KUBERNETES_VERSIONS; returns the keys of the FOREIGN_KINDS objects it has no schema for. Raises
    AssertionError listing every invalid object, or any other kind without a schema."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    errors: list[str] = []
    unchecked: list[tuple[str, str, str]] = []
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{key(obj)} (Kubernetes {version}): {path}: {exc.message}")
            except SchemaNotFoundError:
                if (obj["apiVersion"], obj["kind"]) not in FOREIGN_KINDS:
                    errors.append(
                        f"{key(obj)}: kubernetes-validate has no schema for {obj['apiVersion']} {obj['kind']}"
                    )
                elif key(obj) not in unchecked:
                    unchecked.append(key(obj))
    assert not errors, "invalid objects:\n" + "\n".join(errors)
    return unchecked


def without_helm_labels(obj: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with Helm's own labels removed everywhere they occur (metadata and pod templates)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for name, value in node.items():
                if name == "labels" and isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k not in HELM_ONLY_LABELS}
                out[name] = strip(value)
            return out
        if isinstance(node, list):
            return [strip(item) for item in node]
        return node

    return strip(obj)


def rule_triples(rules: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """RBAC rules as (apiGroup, resource, verb) triples, so that equal permissions compare equal however
    they are grouped into rules."""
    triples: set[tuple[str, str, str]] = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields (resourceNames?): {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    triples.add((group, resource, verb))
    return triples


def required_rules() -> list[dict[str, Any]]:
    """The operator's RBAC, as its code declares it (mergesearch_operator.k8s.permissions.RULES)."""
    try:
        from mergesearch_operator.k8s.permissions import RULES
    except ImportError as exc:
        raise AssertionError(
            "mergesearch_operator.k8s.permissions.RULES is missing: the chart's RBAC is checked against the rules "
            f"the operator declares there ({exc})"
        ) from None
    return list(RULES)
