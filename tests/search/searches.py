"""Manifests and controllers over the synthetic executor, for the tests of the search controller."""

from __future__ import annotations

import copy
from typing import Any

from mergesearch_operator.search.controller import SearchController
from mergesearch_operator.search.storage import SingleWriterStorage
from mergesearch_operator.search.study import controller_storage, open_study
from mergesearch_operator.spaces import ModelFacts, build_space
from mergesearch_operator.spec import parse_manifest
from tests.search.synthetic import SyntheticExecutor

EXPERTS = ("reverse", "sort", "shift")
BASE_MANIFEST: dict[str, Any] = {
    "apiVersion": "mergesearch.io/v1alpha1",
    "kind": "MergeSearch",
    "metadata": {"name": "synthetic"},
    "spec": {
        "models": {"base": "/models/base", "experts": [{"name": e, "uri": f"/models/{e}"} for e in EXPERTS]},
        "searchSpace": {"type": "LFS", "layerGroups": 2, "methods": ["linear", "task_arithmetic", "ties"]},
        "objectives": [{"name": e, "data": f"/tasks/{e}.jsonl"} for e in EXPERTS],
        "fidelity": {"minSamples": 10, "maxSamples": 90, "reductionFactor": 3},
        "budget": {"maxTrials": 30, "parallelTrials": 4},
    },
}
FACTS = ModelFacts(
    model_uris={"base": "/models/base", **{e: f"/models/{e}" for e in EXPERTS}}, experts=EXPERTS, num_layers=4
)


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    document = copy.deepcopy(BASE_MANIFEST)
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(document["spec"].get(key), dict):
            document["spec"][key].update(value)
        else:
            document["spec"][key] = value
    return document


def make_controller(
    document: dict[str, Any], storage: SingleWriterStorage | str, executor: SyntheticExecutor
) -> SearchController:
    resource = parse_manifest(document)
    if isinstance(storage, str):
        storage = controller_storage(storage)
    study = open_study(resource.metadata.name, resource.spec, storage)
    return SearchController(
        name=resource.metadata.name,
        spec=resource.spec,
        study=study,
        space=build_space(resource.spec, FACTS),
        facts=FACTS,
        executor=executor,
        storage=storage,
    )


def run_to_end(controller: SearchController, limit: int = 5000):
    for _ in range(limit):
        status = controller.reconcile()
        if status.phase in ("Succeeded", "Failed"):
            return status
    raise AssertionError(f"search did not finish in {limit} reconciles: {status}")
