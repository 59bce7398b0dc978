"""A merge plan as a mergekit 0.1.5 recipe, where mergekit can reproduce its tensors exactly.

mergekit runs one method per recipe and takes the embeddings from the first slice and the final norm
and head from the last. A plan that fits (one method, embed/head slices first and last) becomes one
recipe for `mergekit-yaml`. Any other plan - an LFS plan whose layer groups use different methods, a
DIS plan whose scaled layers are merged rather than copied - becomes a `mergekit-multi` file: one named
recipe per (method, number of inputs) merges those slices into an intermediate model (one count per
recipe: mergekit gathers the head from as many models as the first slice has), and a final unnamed
`passthrough` recipe assembles the output from the intermediates' layers. The
intermediate that supplies the first (last) layers takes the plan's embed (head) slice as its first
(last) slice, so the embeddings, final norm and lm_head follow the same slices and parameters as in the
engine; an embed or head slice that is not the first or last slice is added there as extra layers,
which the final recipe does not take. DIS output scales become passthrough `scale` filters on `o_proj`
and `down_proj` (the folding the engine does, written out), in the single recipe when it is a
passthrough of one-layer slices, otherwise in the final recipe, one slice per scaled layer. A plan's
`dtype` becomes `dtype: float32` (mergekit computes in it) and `out_dtype`, as the engine computes.

Not expressible (`NotExpressible` says which slice): DARE (mergekit draws a different random drop and
rescales to the L1 norm, not by 1/density), a slice that lists one model twice (mergekit refuses
duplicate inputs), and an embed or head slice whose method or number of inputs differs from the first
or last slice's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from .ir import Conditional, LayerSlice, MergePlan
from .methods import METHODS, get_method
from .tensors import RESIDUAL_OUTPUT_PROJECTIONS


class NotExpressible(ValueError):
    """mergekit 0.1.5 cannot reproduce this plan's tensors; the message says which part and why."""


@dataclass(frozen=True)
class MergekitRecipe:
    """A recipe's YAML text and the mergekit command that runs it."""

    text: str
    command: Literal["mergekit-yaml", "mergekit-multi"]

    @property
    def file_name(self) -> str:
        """What to call the file next to a merge: the command's name, so the file says how to run it."""
        return "mergekit.yaml" if self.command == "mergekit-yaml" else "mergekit-multi.yaml"


class _Dumper(yaml.SafeDumper):
    """Lists of numbers (layer ranges) in flow style, `[0, 4]`, as mergekit writes them."""


_Dumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq",
        data,
        flow_style=all(isinstance(e, int | float) and not isinstance(e, bool) for e in data) and bool(data),
    ),
)


def _setting(entries: list[Conditional]) -> Any:
    if len(entries) == 1 and entries[0].filter in (None, "*"):
        return entries[0].value
    return [{"filter": e.filter, "value": e.value} if e.filter else {"value": e.value} for e in entries]


def _scale_setting(factor: float) -> list[dict[str, Any]]:
    """Passthrough's `scale` for DIS: `factor` on the residual output projections, 1 on the rest."""
    return [{"filter": p.strip("."), "value": factor} for p in RESIDUAL_OUTPUT_PROJECTIONS] + [{"value": 1.0}]


def _dtypes(plan: MergePlan) -> dict[str, str]:
    """Compute in float32 and write the plan's dtype, as the engine does; nothing when the plan keeps the inputs'."""
    if plan.dtype is None:
        return {}
    return {"dtype": "float32", **({"out_dtype": plan.dtype} if plan.dtype != "float32" else {})}


def _layer_scales(plan: MergePlan) -> list[float]:
    """The factor the engine folds into each output layer's o_proj and down_proj (1 / the scales before it)."""
    factors, cumulative = [], 1.0
    for layer_slice in plan.slices:
        for _ in range(layer_slice.num_layers):
            factors.append(1.0 / cumulative)
            cumulative *= layer_slice.output_scale
    return factors


def _check(plan: MergePlan) -> None:
    for i, layer_slice in enumerate(plan.slices):
        if not get_method(layer_slice.method).mergekit_exact:
            exact = sorted(name for name, spec in METHODS.items() if spec.mergekit_exact)
            raise NotExpressible(
                f"slices[{i}] uses {layer_slice.method!r}, which mergekit computes differently "
                f"(DARE's random drop and its rescaling differ); mergekit reproduces {exact}"
            )
        models = layer_slice.models()
        if len(set(models)) != len(models):
            raise NotExpressible(f"slices[{i}] lists a model twice, which mergekit refuses")


def _location(plan: MergePlan, model: str) -> str:
    """Where mergekit finds `model`: a local path as a path; other URIs as given (fetch them first)."""
    return plan.models[model].removeprefix("file://")


def _slice(plan: MergePlan, layer_slice: LayerSlice, scale: float = 1.0) -> dict[str, Any]:
    """One mergekit output slice: the base first among the sources (mergekit finds it there), then the sources."""
    sources = []
    if layer_slice.base is not None:
        sources.append({"model": _location(plan, layer_slice.base.model), "layer_range": list(layer_slice.base.layers)})
    for source in layer_slice.sources:
        entry: dict[str, Any] = {"model": _location(plan, source.model), "layer_range": list(source.layers)}
        params = {name: _setting(setting) for name, setting in source.params.items()}
        if scale != 1.0:
            params["scale"] = _scale_setting(scale)
        if params:
            entry["parameters"] = params
        sources.append(entry)
    out: dict[str, Any] = {"sources": sources}
    if layer_slice.params:
        out["parameters"] = {name: _setting(setting) for name, setting in layer_slice.params.items()}
    if layer_slice.base is not None:
        out["base_model"] = _location(plan, layer_slice.base.model)
    return out


def _recipe(plan: MergePlan, method: str, slices: list[dict[str, Any]], dtypes: dict[str, str]) -> dict[str, Any]:
    recipe: dict[str, Any] = {"slices": slices, "merge_method": method}
    # The output's config.json and tokenizer come from mergekit's base model (else from an arbitrary input).
    recipe["base_model"] = _location(plan, plan.config_model)
    return recipe | dtypes


def _single(plan: MergePlan) -> dict[str, Any] | None:
    """The plan as one `mergekit-yaml` recipe, or None when it needs several."""
    last = len(plan.slices) - 1
    if plan.embed_slice % len(plan.slices) != 0 or plan.head_slice % len(plan.slices) != last:
        return None
    if len({(s.method, len(s.models())) for s in plan.slices}) != 1:
        return None  # mergekit gathers the head over as many models as the first slice has
    method = plan.slices[0].method
    factors = _layer_scales(plan)
    slices, layer = [], 0
    for layer_slice in plan.slices:
        scales = set(factors[layer : layer + layer_slice.num_layers])
        layer += layer_slice.num_layers
        if scales != {1.0} and (method != "passthrough" or len(scales) > 1):
            return None  # a scale per layer, or on a merged tensor, needs the final passthrough of the multi form
        if scales != {1.0} and any("scale" in s.params for s in layer_slice.sources):
            return None
        slices.append(_slice(plan, layer_slice, scales.pop()))
    return _recipe(plan, method, slices, _dtypes(plan))


def _multi(plan: MergePlan) -> list[dict[str, Any]]:
    """Named recipes for intermediate models, then the unnamed passthrough that assembles the output."""
    count = len(plan.slices)
    embed, head = plan.embed_slice % count, plan.head_slice % count

    def key(i: int) -> tuple[str, int]:
        return plan.slices[i].method, len(plan.slices[i].models())

    groups: dict[tuple[str, int], list[int]] = {}
    for i in range(count):
        groups.setdefault(key(i), []).append(i)
    for index, role, target in ((embed, "embeddings", 0), (head, "final norm and lm_head", count - 1)):
        if index != target and key(index) != key(target):
            raise NotExpressible(
                f"the {role} follow slices[{index}] ({plan.slices[index].method}), but mergekit takes them "
                f"from the recipe that merges slices[{target}] ({plan.slices[target].method})"
            )

    where: dict[int, tuple[str, int]] = {}  # plan slice -> (intermediate, its first layer there)
    documents: list[dict[str, Any]] = []
    # Intermediates in full precision when the plan casts: the final recipe casts once, as the engine does.
    inner_dtypes = {"dtype": "float32"} if plan.dtype is not None else {}
    for number, ((method, _), members) in enumerate(groups.items()):
        name = f"part{number}-{method.replace('_', '-')}"
        order: Sequence[int] = members
        extra_first = 0
        if 0 in members and embed != 0:
            order, extra_first = [embed, *order], plan.slices[embed].num_layers
        if count - 1 in members and head != count - 1:
            order = [*order, head]
        layer = extra_first
        for i in members:
            where[i] = (name, layer)
            layer += plan.slices[i].num_layers
        recipe = _recipe(plan, method, [_slice(plan, plan.slices[i]) for i in order], inner_dtypes)
        documents.append({"name": name, **recipe})

    # The output, layer by layer: (intermediate, its layer, DIS factor), then one final slice per run of
    # consecutive layers of one intermediate with one factor.
    factors = iter(_layer_scales(plan))
    layers = [
        (name, start + offset, next(factors))
        for i, (name, start) in sorted(where.items())
        for offset in range(plan.slices[i].num_layers)
    ]
    runs: list[tuple[str, int, int, float]] = []
    for name, index, factor in layers:
        if runs and runs[-1][0] == name and runs[-1][2] == index and runs[-1][3] == factor:
            runs[-1] = (name, runs[-1][1], index + 1, factor)
        else:
            runs.append((name, index, index + 1, factor))
    final: list[dict[str, Any]] = []
    for name, begin, end, factor in runs:
        source: dict[str, Any] = {"model": name, "layer_range": [begin, end]}
        if factor != 1.0:
            source["parameters"] = {"scale": _scale_setting(factor)}
        final.append({"sources": [source]})
    first = where[0][0]
    documents.append({"slices": final, "merge_method": "passthrough", "base_model": first} | _dtypes(plan))
    return documents


def mergekit_recipe(plan: MergePlan) -> MergekitRecipe:
    """The plan as a mergekit recipe that gives the same tensors; raise `NotExpressible` saying why not."""
    _check(plan)
    single = _single(plan)
    if single is not None:
        return MergekitRecipe(
            text="# Written by MergeSearch; `mergekit-yaml mergekit.yaml OUT` or `mergesearch merge` on this file "
            "produce the same tensors.\n" + yaml.dump(single, Dumper=_Dumper, sort_keys=False),
            command="mergekit-yaml",
        )
    documents = _multi(plan)
    return MergekitRecipe(
        text="# Written by MergeSearch; `mergekit-multi mergekit-multi.yaml --intermediate-dir DIR --out-path OUT` "
        "produces the same tensors\n# as `mergesearch merge` on the plan (mergesearch_plan.json). The named recipes "
        "merge intermediate models into DIR;\n# the last one assembles OUT from their layers.\n"
        + yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False),
        command="mergekit-multi",
    )


def to_mergekit_yaml(plan: MergePlan) -> str | None:
    """The recipe's text (for `mergekit-yaml`, or a multi-document one for `mergekit-multi`, as its first
    comment line says), or None when mergekit cannot reproduce this plan (`mergekit_recipe` says why)."""
    try:
        return mergekit_recipe(plan).text
    except NotExpressible:
        return None
