"""The cluster examples in manifests/examples: valid for the operator's parser and for the CRD's schema."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml

from mergesearch_operator.spec import MergeSearch, parse_manifest
from mergesearch_trial_runner.evaluate import registry
from tests.install.tree import MANIFESTS_CRD, REPO, InstallTree

EXAMPLES = ("lfs-single-objective.yaml", "dis.yaml", "lfs-multi-objective.yaml")


def _load(name: str) -> dict[str, Any]:
    (document,) = yaml.safe_load_all((REPO / "manifests" / "examples" / name).read_text())
    return document


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_parses(name: str):
    """`parse_manifest` (what the operator runs on every reconcile) accepts the example."""
    resource = parse_manifest(_load(name))
    assert resource.kind == "MergeSearch" and resource.metadata.namespace is None  # the applier chooses it


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_a_cluster_search(name: str):
    """Models, task data and output on S3, one GPU per trial run, Secrets for the study and S3, vLLM."""
    spec = parse_manifest(_load(name)).spec
    uris = [*spec.model_uris().values(), spec.output.uri]
    uris += [o.data for o in spec.objectives] + [o.test_data for o in spec.objectives if o.test_data]
    assert all(uri and uri.startswith("s3://") for uri in uris), uris
    assert spec.trial.resources["limits"]["nvidia.com/gpu"] == "1"
    assert spec.trial.backend == "vllm"
    assert spec.storage.database_secret_ref and spec.storage.s3_secret_ref


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_engine_args_are_valid_vllm_settings(name: str):
    """The trial's engineArgs pass the vLLM backend's settings model (what the trial runner checks)."""
    spec = parse_manifest(_load(name)).spec
    registry.validate_settings(spec.trial.backend, spec.trial.engine_args)


def test_examples_cover_both_spaces_and_both_objective_modes():
    resources: dict[str, MergeSearch] = {name: parse_manifest(_load(name)) for name in EXAMPLES}
    assert resources["lfs-single-objective.yaml"].spec.search_space.type == "LFS"
    assert len(resources["lfs-single-objective.yaml"].spec.objectives) == 1
    assert resources["dis.yaml"].spec.search_space.type == "DIS"
    multi = resources["lfs-multi-objective.yaml"].spec
    assert multi.search_space.type == "LFS" and multi.search.objective_mode == "pareto" and len(multi.objectives) >= 2
    assert len({r.metadata.name for r in resources.values()}) == len(EXAMPLES)


def _json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI v3 schema as JSON Schema (draft 4, whose boolean exclusiveMinimum OpenAPI shares), with
    unknown fields rejected as `kubectl apply --validate=strict` (the default) rejects them."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {name: _json_schema(child) for name, child in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = _json_schema(node["items"])
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    return out


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_passes_the_crd_schema(tree: InstallTree, name: str):
    """The API server would accept the example: the generated CRD's openAPIV3Schema validates it."""
    (crd,) = yaml.safe_load_all((tree.root / MANIFESTS_CRD).read_text())
    (version,) = crd["spec"]["versions"]
    schema = _json_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"] |= {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
    }
    document = _load(name)
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(document), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
