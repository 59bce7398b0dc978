"""What a search space is: a define-by-run mapping from an Optuna trial to a merge plan.

A space asks the trial for parameters (only those that matter for the choices already made, so a group
using TIES is never asked for a SLERP factor) and returns a `MergePlan`, or `Skip` for a candidate that
must not be evaluated (a DIS stack over the depth cap). Because the mapping is define-by-run, a stored
trial's plan is rebuilt by replaying its parameters through `optuna.trial.FixedTrial`: the parameters in
the study are the whole truth.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import optuna

from mergesearch_trial_runner.plan.ir import MergePlan


class SpaceError(ValueError):
    """A search space that cannot be built for these models; `field` is the searchSpace field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Skip:
    """A candidate that is not evaluated and not scored as a failure; `reason` says why."""

    reason: str


@dataclass(frozen=True)
class ModelFacts:
    """What a space needs to know of the models: names, locations and the base's depth."""

    model_uris: dict[str, str]  # "base" and every expert
    experts: tuple[str, ...]
    num_layers: int

    def to_json(self) -> dict[str, Any]:
        """As JSON data (a study attribute: facts are read once, at a search's first preflight)."""
        return {"model_uris": self.model_uris, "experts": list(self.experts), "num_layers": self.num_layers}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelFacts:
        return cls(dict(data["model_uris"]), tuple(data["experts"]), int(data["num_layers"]))


class SearchSpace(ABC):
    def __init__(self, facts: ModelFacts, *, seed: int = 0):
        self.facts = facts
        self.seed = seed

    @abstractmethod
    def suggest(self, trial: optuna.trial.BaseTrial) -> MergePlan | Skip:
        """Ask `trial` for this candidate's parameters and build its plan."""

    @abstractmethod
    def initial_params(self) -> list[dict[str, Any]]:
        """Parameters of the initial design (each expert alone, and the baselines the space can express)."""

    def plan_of(self, params: dict[str, Any]) -> MergePlan | Skip:
        """Rebuild a stored trial's plan from its parameters."""
        return self.suggest(optuna.trial.FixedTrial(params))

    def _plan(self, slices: list[dict[str, Any]], **extra: Any) -> MergePlan:
        return MergePlan.model_validate(
            {"models": dict(self.facts.model_uris), "base_model": "base", "slices": slices, "seed": self.seed, **extra}
        )
