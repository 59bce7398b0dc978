"""The kustomize install (manifests/), built with `kubectl kustomize`: valid, and the same as the chart's renders."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.install.tree import (
    CHART_DASHBOARD,
    NAMESPACE,
    REPO,
    InstallTree,
    by_key,
    kustomize_build,
    of_kind,
    render_chart,
    validate_strictly,
    without_helm_labels,
)

# Each overlay and the chart values that install the same thing (release `mergesearch` in `mergesearch`).
OVERLAYS = {
    "single-namespace": None,
    "cluster-wide": {"watch": {"allNamespaces": True}},
}
CLUSTER_EXAMPLES = ("lfs-single-objective.yaml", "dis.yaml", "lfs-multi-objective.yaml")


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    left = yaml.safe_dump(a, sort_keys=True).splitlines()
    right = yaml.safe_dump(b, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(left, right, "kustomize", "helm", lineterm="", n=2))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_valid_objects(tree: InstallTree, overlay: str):
    """kubernetes-validate --strict accepts every object of the build for Kubernetes 1.27 and 1.37."""
    objects = kustomize_build(tree.manifests / "overlays" / overlay)
    assert validate_strictly(objects) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_installs_what_the_chart_installs(tree: InstallTree, overlay: str):
    """Object for object, field for field, the overlay equals `helm template mergesearch charts/mergesearch
    -n mergesearch --include-crds` with the matching values, less Helm's own labels; the overlay adds only
    the Namespace (`helm install --create-namespace` does that)."""
    built = by_key(without_helm_labels(o) for o in kustomize_build(tree.manifests / "overlays" / overlay))
    rendered = by_key(without_helm_labels(o) for o in render_chart(tree.chart, OVERLAYS[overlay]))
    assert built.pop(("Namespace", "", NAMESPACE))["metadata"] == {"name": NAMESPACE}
    assert sorted(built) == sorted(rendered)
    different = [f"{k}:\n{_diff(built[k], rendered[k])}" for k in sorted(built) if built[k] != rendered[k]]
    assert not different, "\n".join(different)


def test_base_dashboard_is_the_chart_dashboard():
    """manifests/base/dashboards/ holds a byte-identical copy of the chart's dashboard: kustomize, like Helm,
    reads no file outside its own directory."""
    copy = Path("manifests/base/dashboards/mergesearch.json")
    assert (REPO / copy).read_bytes() == (REPO / CHART_DASHBOARD).read_bytes(), f"cp {CHART_DASHBOARD} {copy}"


def test_examples_kustomization_holds_the_cluster_examples(tree: InstallTree):
    """manifests/examples builds to the three cluster examples (the local quickstart and the mergekit
    recipe stay out), so a GitOps tool can sync the folder."""
    objects = kustomize_build(tree.manifests / "examples")
    assert [o["kind"] for o in objects] == ["MergeSearch"] * len(CLUSTER_EXAMPLES)
    listed = yaml.safe_load((tree.manifests / "examples" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(CLUSTER_EXAMPLES)


def test_argocd_applications_point_at_paths_that_build(tree: InstallTree):
    """Each Argo CD Application names a path of this repository that `kubectl kustomize` builds; the
    operator's destination is the overlay's namespace; the operator syncs before the searches."""
    applications = kustomize_build(tree.manifests / "gitops" / "argocd")
    assert {(a["apiVersion"], a["kind"]) for a in applications} == {("argoproj.io/v1alpha1", "Application")}
    assert len({a["spec"]["source"]["repoURL"] for a in applications}) == 1
    waves = {}
    for application in applications:
        source = application["spec"]["source"]
        path = source["path"]
        assert path.startswith("manifests/") and (REPO / path).is_dir(), path
        objects = kustomize_build(tree.root / path)
        kinds = {o["kind"] for o in objects}
        waves[frozenset(kinds)] = int(application["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
        if "Deployment" in kinds:
            namespace = yaml.safe_load((REPO / path / "kustomization.yaml").read_text())["namespace"]
            assert application["spec"]["destination"]["namespace"] == namespace
            assert "ServerSideApply=true" in application["spec"]["syncPolicy"]["syncOptions"]
    operator_wave = next(w for kinds, w in waves.items() if "CustomResourceDefinition" in kinds)
    searches_wave = next(w for kinds, w in waves.items() if kinds == {"MergeSearch"})
    assert operator_wave < searches_wave


def test_overlays_watch_the_namespace_they_grant(tree: InstallTree):
    """In the single-namespace overlay, the namespace the operator watches (--namespace) is the one its Role
    is in (the overlay's comment says to change both together)."""
    objects = kustomize_build(tree.manifests / "overlays" / "single-namespace")
    (deployment,) = of_kind(objects, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    watched = [args[i + 1] for i, arg in enumerate(args) if arg == "--namespace"]
    assert watched == [r["metadata"]["namespace"] for r in of_kind(objects, "Role")]
