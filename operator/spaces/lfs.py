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
from mergesearch_trial_runner.plan.methods import get_method

from .base import ModelFacts, SearchSpace, Skip
from .baselines import HAND_RECIPES, Recipe

REST = "rest"
# (method, parameter) -> search range; per-source parameters are asked once per expert. Task arithmetic
# has a scale per group as in the paper: weights in [0, 1] alone make summed task vectors one corner of
# the cube, and on real LLMs the sum is often where the good merges are (the mean is near the base).
RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("linear", "weight"): (0.0, 1.0),
    ("task_arithmetic", "weight"): (0.0, 1.0),
    ("task_arithmetic", "lambda"): (0.5, 2.0),
    ("ties", "weight"): (0.0, 1.0),
    ("ties", "density"): (0.1, 1.0),
    ("ties", "lambda"): (0.5, 1.5),
    ("dare_linear", "weight"): (0.0, 1.0),
    ("dare_linear", "density"): (0.1, 1.0),
    ("dare_ties", "weight"): (0.0, 1.0),
    ("dare_ties", "density"): (0.1, 1.0),
    ("slerp", "t"): (0.0, 1.0),
}
PER_SOURCE = {"weight"}
# (method, parameter) -> choices: TIES normalised (mergekit's default) or summed.
CHOICES: dict[tuple[str, str], tuple[bool, ...]] = {("ties", "normalize"): (True, False)}


def layer_groups(num_layers: int, *, groups: int | None = None, per_group: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering every layer; earlier groups take the remainder."""
    count = groups if groups is not None else -(-num_layers // (per_group or num_layers))
    if not 1 <= count <= num_layers:
        raise ValueError(f"{count} layer groups do not fit a model of {num_layers} layers")
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
        layers = [start, end]
        if method == "slerp":
            pair = str(trial.suggest_categorical(f"g{g}.slerp.pair", self.slerp_pairs))
            first, second = pair.split("|")
            t = {tg: trial.suggest_float(f"g{g}.slerp.{tg}.t", *RANGES[("slerp", "t")]) for tg in self.tensor_groups}
            return {
                "method": "slerp",
                "base": {"model": first, "layers": layers},
                "sources": [{"model": second, "layers": layers}],
                "params": {"t": self._conditional(t)},
            }
        names = [name for (m, name) in RANGES if m == method]
        shared = {
            name: self._conditional(
                {
                    tg: trial.suggest_float(f"g{g}.{method}.{tg}.{name}", *RANGES[(method, name)])
                    for tg in self.tensor_groups
                }
            )
            for name in names
            if name not in PER_SOURCE
        }
        for (m, name), choices in CHOICES.items():
            if m == method:
                shared[name] = self._conditional(
                    {tg: trial.suggest_categorical(f"g{g}.{method}.{tg}.{name}", choices) for tg in self.tensor_groups}
                )
        sources = []
        for expert in self.facts.experts:
            weights = {
                tg: trial.suggest_float(f"g{g}.{method}.{tg}.weight.{expert}", *RANGES[(method, "weight")])
                for tg in self.tensor_groups
            }
            sources.append({"model": expert, "layers": layers, "params": {"weight": self._conditional(weights)}})
        if method == "linear" and all(
            entry["value"] < 1e-6 for s in sources for entry in s["params"]["weight"]
        ):  # all weights zero cannot be normalised: read as uniform
            for s in sources:
                s["params"]["weight"] = 1.0
        layer_slice: dict[str, Any] = {"method": method, "sources": sources, "params": shared}
        if method != "linear":
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
        spec = get_method(recipe.method)
        weight = recipe.weight_for(len(self.facts.experts))
        low, high = RANGES[(recipe.method, "weight")]
        if not low <= weight <= high:
            return None
        values: dict[str, Any] = {f"weight.{e}": weight for e in self.facts.experts}
        for (method, name), (low, high) in RANGES.items():
            if method == recipe.method and name not in PER_SOURCE:
                values[name] = recipe.params.get(name, spec.param(name).default)
                if not low <= values[name] <= high:
                    return None
        for (method, name), choices in CHOICES.items():
            if method == recipe.method:
                values[name] = recipe.params.get(name, spec.param(name).default)
                if values[name] not in choices:
                    return None
        if set(recipe.params) - set(values):  # a parameter the space keeps at its default
            return None
        return self._everywhere(recipe.method, values)

    def initial_params(self) -> list[dict[str, Any]]:
        experts = list(self.facts.experts)
        design = []
        if "linear" in self.methods:
            for chosen in experts:
                design.append(self._everywhere("linear", {f"weight.{e}": float(e == chosen) for e in experts}))
        for recipe in HAND_RECIPES:
            params = self.recipe_params(recipe)
            if params is not None and params not in design:
                design.append(params)
        return design
