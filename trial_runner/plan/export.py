"""A merge plan as a mergekit YAML recipe, where mergekit can express it exactly.

mergekit runs one method per recipe and follows the first and last slice for embeddings and head, so a
plan is expressible when every slice uses the same method, that method computes the same in both tools
(linear, task_arithmetic, ties, slerp, passthrough; DARE's random drop differs) and its embed/head
slices are the first and last. DIS output scales become passthrough `scale` filters on `o_proj` and
`down_proj`: the folding the engine does, written out.
"""

from __future__ import annotations

from typing import Any

import yaml

from .ir import Conditional, MergePlan
from .tensors import RESIDUAL_OUTPUT_PROJECTIONS

EXPRESSIBLE = frozenset({"linear", "task_arithmetic", "ties", "slerp", "passthrough"})


def _setting(entries: list[Conditional]) -> Any:
    if len(entries) == 1 and entries[0].filter in (None, "*"):
        return entries[0].value
    return [{"filter": e.filter, "value": e.value} if e.filter else {"value": e.value} for e in entries]


def to_mergekit_yaml(plan: MergePlan) -> str | None:
    """The recipe, or None when mergekit cannot express this plan exactly."""
    methods = {s.method for s in plan.slices}
    if len(methods) != 1 or not methods <= EXPRESSIBLE:
        return None
    if plan.embed_slice % len(plan.slices) != 0 or plan.head_slice % len(plan.slices) != len(plan.slices) - 1:
        return None
    method = methods.pop()
    slices: list[dict[str, Any]] = []
    cumulative = 1.0  # product of the output scales of the layers before this slice
    for layer_slice in plan.slices:
        if layer_slice.num_layers > 1 and layer_slice.output_scale != 1.0:
            return None  # a scale per layer inside a multi-layer slice needs per-layer filters
        sources = []
        if layer_slice.base is not None:
            sources.append({"model": plan.models[layer_slice.base.model], "layer_range": list(layer_slice.base.layers)})
        for source in layer_slice.sources:
            entry: dict[str, Any] = {"model": plan.models[source.model], "layer_range": list(source.layers)}
            params = {name: _setting(setting) for name, setting in source.params.items()}
            if cumulative != 1.0:
                if method != "passthrough" or "scale" in params:
                    return None
                factor = 1.0 / cumulative
                params["scale"] = [{"filter": p.strip("."), "value": factor} for p in RESIDUAL_OUTPUT_PROJECTIONS] + [
                    {"value": 1.0}
                ]
            if params:
                entry["parameters"] = params
            sources.append(entry)
        out_slice: dict[str, Any] = {"sources": sources}
        if layer_slice.params:
            out_slice["parameters"] = {name: _setting(setting) for name, setting in layer_slice.params.items()}
        if layer_slice.base is not None:
            out_slice["base_model"] = plan.models[layer_slice.base.model]
        slices.append(out_slice)
        cumulative *= layer_slice.output_scale
    recipe: dict[str, Any] = {"slices": slices, "merge_method": method}
    if plan.base_model is not None:
        recipe["base_model"] = plan.models[plan.base_model]
    if plan.dtype is not None:
        recipe["dtype"] = plan.dtype
    return (
        "# Written by MergeSearch; `mergekit-yaml` or `mergesearch merge` produce the same tensors.\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
