"""DIS, depth-wise integration search: per depth position, which experts' layers to stack, in which order.

At each position p of the base's depth the search picks a subset of the experts, an order for them
(when two or more are picked) and an output scale; the merged model stacks layer p of each picked expert
in that order, or the base's layer p when none is picked (the paper's "remain base"). The scale applies
to the last block of the position, as in the reference implementation, and the engine folds it into the
weights (see docs/merging.md). A stack deeper than `max_depth` is skipped: never evaluated, not a failure.
"""

from __future__ import annotations

from itertools import permutations
from typing import Any

import optuna

from mergesearch_trial_runner.plan.ir import MergePlan

from .base import ModelFacts, SearchSpace, Skip, SpaceError


class DepthwiseIntegration(SearchSpace):
    def __init__(
        self,
        facts: ModelFacts,
        *,
        max_depth: int | None = None,
        scale_range: tuple[float, float] = (0.8, 1.2),
        seed: int = 0,
    ):
        super().__init__(facts, seed=seed)
        self.max_depth = max_depth or (3 * facts.num_layers) // 2
        if self.max_depth < facts.num_layers:  # every position stacks at least one layer
            raise SpaceError(
                "maxDepth",
                f"maxDepth {self.max_depth} is below the base's {facts.num_layers} layers, so every candidate "
                f"would be skipped; set maxDepth to at least {facts.num_layers} (default: 1.5x the base's depth)",
            )
        self.scale_range = scale_range

    def suggest(self, trial: optuna.trial.BaseTrial) -> MergePlan | Skip:
        slices: list[dict[str, Any]] = []
        for position in range(self.facts.num_layers):
            picked = [e for e in self.facts.experts if trial.suggest_categorical(f"p{position}.{e}", [False, True])]
            if len(picked) > 1:
                orders = ["+".join(order) for order in permutations(picked)]
                picked = str(trial.suggest_categorical(f"p{position}.order.{'+'.join(picked)}", orders)).split("+")
            scale = trial.suggest_float(f"p{position}.scale", *self.scale_range)
            blocks = picked or ["base"]
            for index, model in enumerate(blocks):
                slices.append(
                    {
                        "method": "passthrough",
                        "sources": [{"model": model, "layers": [position, position + 1]}],
                        "output_scale": scale if index == len(blocks) - 1 else 1.0,
                    }
                )
        if len(slices) > self.max_depth:
            return Skip(f"{len(slices)} layers exceed the depth cap of {self.max_depth}")
        return self._plan(slices)

    def initial_params(self) -> list[dict[str, Any]]:
        design = []
        for chosen in self.facts.experts:
            params: dict[str, Any] = {}
            for position in range(self.facts.num_layers):
                for expert in self.facts.experts:
                    params[f"p{position}.{expert}"] = expert == chosen
                params[f"p{position}.scale"] = 1.0
            design.append(params)
        return design
