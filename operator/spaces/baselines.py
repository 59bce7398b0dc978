"""The fixed merges every search starts from and is compared with: each expert alone and the hand recipes.

The hand recipes are what a user tries first in mergekit, one method with the same parameters for every
tensor: a linear average; task arithmetic with the mean task vector and with the summed task vectors;
TIES at density 0.5, normalised (mergekit's default) and summed; DARE-TIES at density 0.5. On real
LLMs they spread widely (the mean task vector can be near the base, summed ones near the best), so a
search enqueues every recipe its space can express and is judged against the best of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergesearch_trial_runner.plan.ir import MergePlan

from .base import ModelFacts


@dataclass(frozen=True)
class Recipe:
    """One method over the whole model, every expert with the same weight and the same parameters."""

    label: str
    method: str
    weight: float | None  # per expert; None: 1 / number of experts (the mean task vector)
    params: dict[str, float | bool] = field(default_factory=dict)  # beyond the method's defaults

    def weight_for(self, experts: int) -> float:
        return 1.0 / experts if self.weight is None else self.weight


HAND_RECIPES: tuple[Recipe, ...] = (
    Recipe("linear", "linear", weight=1.0),
    Recipe("task_arithmetic", "task_arithmetic", weight=None),
    Recipe("task_arithmetic_sum", "task_arithmetic", weight=1.0),
    Recipe("ties", "ties", weight=1.0, params={"density": 0.5}),
    Recipe("ties_sum", "ties", weight=1.0, params={"density": 0.5, "normalize": False}),
    Recipe("dare_ties", "dare_ties", weight=1.0, params={"density": 0.5}),
)


def expert_alone(facts: ModelFacts, expert: str) -> MergePlan:
    return _whole_model(facts, {"method": "linear", "sources": [_whole(facts, expert, weight=1.0)]})


def recipe_plan(facts: ModelFacts, recipe: Recipe) -> MergePlan:
    weight = recipe.weight_for(len(facts.experts))
    slice_ = {
        "method": recipe.method,
        "sources": [_whole(facts, e, weight=weight) for e in facts.experts],
        "params": dict(recipe.params),
    }
    if recipe.method != "linear":
        slice_["base"] = {"model": "base", "layers": [0, facts.num_layers]}
    return _whole_model(facts, slice_)


def baselines(facts: ModelFacts) -> dict[str, MergePlan]:
    """Label -> plan: `expert:<name>` for each expert, then each hand recipe by its label."""
    plans = {f"expert:{e}": expert_alone(facts, e) for e in facts.experts}
    plans.update({recipe.label: recipe_plan(facts, recipe) for recipe in HAND_RECIPES})
    return plans


def is_baseline(label: str) -> bool:
    return label.startswith("expert:") or label in {recipe.label for recipe in HAND_RECIPES}


def _whole(facts: ModelFacts, model: str, **params: float) -> dict:
    return {"model": model, "layers": [0, facts.num_layers], "params": params}


def _whole_model(facts: ModelFacts, slice_: dict) -> MergePlan:
    return MergePlan.model_validate({"models": dict(facts.model_uris), "base_model": "base", "slices": [slice_]})
