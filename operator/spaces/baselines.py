"""The fixed merges every search is compared with: each expert alone, uniform task arithmetic, TIES.

Uniform task arithmetic adds the mean task vector (every weight 1/n, lambda 1): no coefficient to tune,
so it is the honest "merge without search". TIES uses the paper's default: keep the top 20% of each task
vector (density 0.2), weights 1, lambda 1, disjoint mean.
"""

from __future__ import annotations

from mergesearch_trial_runner.plan.ir import MergePlan

from .base import ModelFacts

TIES_DEFAULT_DENSITY = 0.2


def _whole(model: str, layers: int, **params: float) -> dict:
    return {"model": model, "layers": [0, layers], "params": params}


def expert_alone(facts: ModelFacts, expert: str) -> MergePlan:
    layers = facts.num_layers
    return MergePlan.model_validate(
        {
            "models": dict(facts.model_uris),
            "base_model": "base",
            "slices": [{"method": "linear", "sources": [_whole(expert, layers, weight=1.0)]}],
        }
    )


def uniform_task_arithmetic(facts: ModelFacts) -> MergePlan:
    layers, count = facts.num_layers, len(facts.experts)
    return MergePlan.model_validate(
        {
            "models": dict(facts.model_uris),
            "base_model": "base",
            "slices": [
                {
                    "method": "task_arithmetic",
                    "base": {"model": "base", "layers": [0, layers]},
                    "sources": [_whole(e, layers, weight=1.0 / count) for e in facts.experts],
                }
            ],
        }
    )


def ties_default(facts: ModelFacts) -> MergePlan:
    layers = facts.num_layers
    return MergePlan.model_validate(
        {
            "models": dict(facts.model_uris),
            "base_model": "base",
            "slices": [
                {
                    "method": "ties",
                    "base": {"model": "base", "layers": [0, layers]},
                    "sources": [_whole(e, layers, weight=1.0, density=TIES_DEFAULT_DENSITY) for e in facts.experts],
                }
            ],
        }
    )


def baselines(facts: ModelFacts) -> dict[str, MergePlan]:
    """Label -> plan: `expert:<name>` for each expert, `task_arithmetic`, `ties`."""
    plans = {f"expert:{e}": expert_alone(facts, e) for e in facts.experts}
    plans["task_arithmetic"] = uniform_task_arithmetic(facts)
    plans["ties"] = ties_default(facts)
    return plans
