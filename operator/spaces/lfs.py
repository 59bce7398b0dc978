"""LFS, layer-wise fusion search: per group of consecutive layers, a merge method and its parameters.

Define-by-run and conditional: a group first picks its method, then only that method's parameters are
asked for, once per tensor group (each name filter such as `self_attn`, `mlp`, and the rest of the
tensors). The paper's reference implementation kept every method's parameters for every group always
on (112 for 3 models and 4 groups); here a TIES group over three experts and three tensor groups asks
for 18 (per tensor group: a weight per expert, density, lambda, normalised or summed). Parameter names
read as `g<group>.<method>.<tensor group>.<parameter>[.<expert>]`.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import optuna

from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.plan.methods import MethodSpec, Searched, get_method

from .base import ModelFacts, SearchSpace, Skip, SpaceError
from .baselines import HAND_RECIPES, Recipe

REST = "rest"
# Values of the searched parameters that leave one expert's task vector as it is, and the methods tried
# in order to express an expert alone (the simplest plan first).
NEUTRAL: dict[str, float | bool] = {"lambda": 1.0, "density": 1.0, "normalize": True}
EXPERT_ALONE_ORDER = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")


def _suggest(trial: optuna.trial.BaseTrial, name: str, search: Searched) -> float | bool:
    if search.choices:
        return trial.suggest_categorical(name, search.choices)
    return trial.suggest_float(name, search.low, search.high)


def _within(value: object, search: Searched) -> bool:
    if search.choices:
        return value in search.choices
    return isinstance(value, int | float) and not isinstance(value, bool) and search.low <= value <= search.high


def layer_groups(num_layers: int, *, groups: int | None = None, per_group: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering every layer; earlier groups take the remainder."""
    count = groups if groups is not None else -(-num_layers // (per_group or num_layers))
    if not 1 <= count <= num_layers:
        field = "layerGroups" if groups is not None else "layersPerGroup"
        raise SpaceError(field, f"{count} layer groups do not fit a model of {num_layers} layers")
    size, extra = divmod(num_layers, count)
    ranges, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


class LayerwiseFusion(SearchSpace):
    def __init__(
        self,
        facts: ModelFacts,
        *,
        methods: list[str],
        tensor_groups: list[str],
        groups: int | None = None,
        layers_per_group: int | None = None,
        seed: int = 0,
    ):
        super().__init__(facts, seed=seed)
        self.methods = list(methods)
        self.tensor_groups = [*tensor_groups, REST]
        self.groups = layer_groups(facts.num_layers, groups=groups, per_group=layers_per_group)
        experts = list(facts.experts)
        self.slerp_pairs = [f"base|{e}" for e in experts] + [f"{a}|{b}" for a, b in combinations(experts, 2)]

    def _conditional(self, values: dict[str, float]) -> list[dict[str, Any]]:
        """Per-tensor-group values as the plan's first-match filter list (the rest last)."""
        return [{"filter": tg, "value": values[tg]} for tg in self.tensor_groups if tg != REST] + [
            {"value": values[REST]}
        ]

    def _group_slice(self, trial: optuna.trial.BaseTrial, g: int, start: int, end: int) -> dict[str, Any]:
        method = trial.suggest_categorical(f"g{g}.method", self.methods)
        spec = get_method(method)
        layers = [start, end]

        def per_tensor_group(name: str, search: Searched) -> list[dict[str, Any]]:
            values = {tg: _suggest(trial, f"g{g}.{method}.{tg}.{name}", search) for tg in self.tensor_groups}
            return self._conditional(values)

        if method == "slerp":  # besides t, which pair to interpolate: the base or an expert, and an expert
            first, second = str(trial.suggest_categorical(f"g{g}.slerp.pair", self.slerp_pairs)).split("|")
            return {
                "method": "slerp",
                "base": {"model": first, "layers": layers},
                "sources": [{"model": second, "layers": layers}],
                "params": {p.name: per_tensor_group(p.name, p.search) for p in spec.searched_params if p.search},
            }
        searched = [(p.name, p.search) for p in spec.searched_params if p.search is not None]
        shared = {name: per_tensor_group(name, search) for name, search in searched if not search.per_source}
        per_source = [(name, search) for name, search in searched if search.per_source]
        sources = [
            {
                "model": expert,
                "layers": layers,
                "params": {name: per_tensor_group(f"{name}.{expert}", search) for name, search in per_source},
            }
            for expert in self.facts.experts
        ]
        if method == "linear" and all(
            entry["value"] < 1e-6 for s in sources for entry in s["params"]["weight"]
        ):  # all weights zero cannot be normalised: read as uniform
            for s in sources:
                s["params"]["weight"] = 1.0
        layer_slice: dict[str, Any] = {"method": method, "sources": sources, "params": shared}
        if spec.needs_base:
            layer_slice["base"] = {"model": "base", "layers": layers}
        return layer_slice

    def suggest(self, trial: optuna.trial.BaseTrial) -> MergePlan | Skip:
        slices = [self._group_slice(trial, g, start, end) for g, (start, end) in enumerate(self.groups)]
        return self._plan(slices)

    def _everywhere(self, method: str, values: dict[str, float]) -> dict[str, Any]:
        """Params giving every group `method` with the same value per parameter name (suffix-matched)."""
        params: dict[str, Any] = {}
        for g in range(len(self.groups)):
            params[f"g{g}.method"] = method
            for tg in self.tensor_groups:
                for name, value in values.items():
                    params[f"g{g}.{method}.{tg}.{name}"] = value
        return params

    def recipe_params(self, recipe: Recipe) -> dict[str, Any] | None:
        """The parameters that make every group `recipe`, or None where the space cannot express it."""
        if recipe.method not in self.methods:
            return None
        searched = [p for p in get_method(recipe.method).searched_params if p.search is not None]
        if set(recipe.params) - {p.name for p in searched}:  # a parameter the space keeps at its default
            return None
        weight = recipe.weight_for(len(self.facts.experts))
        values: dict[str, Any] = {}
        for param in searched:
            value = weight if param.name == "weight" else recipe.params.get(param.name, param.default)
            if not _within(value, param.search):
                return None
            if param.search.per_source:
                values.update({f"{param.name}.{e}": value for e in self.facts.experts})
            else:
                values[param.name] = value
        return self._everywhere(recipe.method, values)

    def expert_params(self, expert: str) -> dict[str, Any] | None:
        """The parameters that make every group `expert` alone, or None where no method can say it.

        A weighted method says it with one-hot weights and neutral parameters (no dropping, no scale,
        normalised), SLERP with t = 1 from the base; the first method in `EXPERT_ALONE_ORDER` is used."""
        ordered = sorted(self.methods, key=lambda m: EXPERT_ALONE_ORDER.index(m) if m in EXPERT_ALONE_ORDER else 99)
        for method in ordered:
            if method == "slerp":
                params = self._everywhere("slerp", {"t": 1.0})
                params.update({f"g{g}.slerp.pair": f"base|{expert}" for g in range(len(self.groups))})
                return params
            values = self._one_hot(get_method(method), expert)
            if values is not None:
                return self._everywhere(method, values)
        return None

    def _one_hot(self, spec: MethodSpec, expert: str) -> dict[str, Any] | None:
        """A weighted method's values for `expert` alone: weight 1 for it, 0 for the others, every other
        searched parameter neutral; None when it has no weight or a parameter without a neutral value."""
        values: dict[str, Any] = {}
        for param in spec.searched_params:
            assert param.search is not None
            if param.name == "weight":
                values.update({f"weight.{e}": float(e == expert) for e in self.facts.experts})
            elif param.name in NEUTRAL and _within(NEUTRAL[param.name], param.search):
                values[param.name] = NEUTRAL[param.name]
            else:
                return None
        return values if any(name.startswith("weight.") for name in values) else None

    def initial_params(self) -> list[dict[str, Any]]:
        design = [params for e in self.facts.experts if (params := self.expert_params(e)) is not None]
        for recipe in HAND_RECIPES:
            params = self.recipe_params(recipe)
            if params is not None and params not in design:
                design.append(params)
        return design
