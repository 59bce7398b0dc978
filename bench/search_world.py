"""The tiny-model world, the search strategies and the statistics that search_efficiency and search_bound share."""

from __future__ import annotations

import math
from typing import Any

from mergesearch_trial_runner.testbed.models import WorldSettings

TASKS = ("reverse", "sort", "shift")
# Not the tests' world. There every task uses the same letters, the experts forget the other tasks, and
# the mean score over tasks is flat along the merges that trade one task for another: uniform task
# arithmetic, in the initial design, is already as good as any merge out of sample, and no search
# strategy can be faster than another at finding it. Here each task has its own letters and each expert
# keeps seeing a fifth of the other tasks, so task vectors add up better and a searched merge can beat
# every merge of the initial design. The test split is larger, so that held-out scores are worth comparing.
WORLD = WorldSettings(task_letters=("abcdefgh", "ijklmnop", "qrstuvwx"), expert_replay=0.2, test_samples=500)
# A 27x range: four rungs (20, 60, 180, 540 samples per task). At 20 -> 180 (three rungs) multi-fidelity
# screened 1.8x as many candidates as full fidelity at the same budget, here 2.1x; the top rung's score
# has 0.58x the standard error (1/sqrt 3).
MIN_SAMPLES, MAX_SAMPLES, ETA = 20, 540, 3
FIDELITY = {"minSamples": MIN_SAMPLES, "maxSamples": MAX_SAMPLES, "reductionFactor": ETA}
# Spec sections per strategy, over the shared manifest below.
STRATEGIES = {
    "multi-fidelity": {"search": {"sampler": "tpe", "multiFidelity": True}},
    "asha": {"search": {"sampler": "tpe", "multiFidelity": True}, "fidelity": {**FIDELITY, "brackets": 1}},
    "full-fidelity": {"search": {"sampler": "tpe", "multiFidelity": False}},
    "random": {"search": {"sampler": "random", "multiFidelity": False}},
}


def manifest(world, name: str, seed: int, strategy: dict[str, Any], sample_budget: int) -> dict[str, Any]:
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name},
        "spec": {
            "models": world.manifest_models(),
            "searchSpace": {
                "type": "LFS",
                "layerGroups": 2,
                # Weighted merges per layer group, one set of parameters for all of a group's tensors: in
                # this world good merges give every expert a weight near 0.6, which a space of five
                # methods with three tensor groups each (up to 30 parameters) hides from a 24-trial search.
                "methods": ["task_arithmetic", "ties"],
                "tensorGroups": [],
            },
            "objectives": world.manifest_objectives(TASKS, maxNewTokens=8),
            "fidelity": FIDELITY,
            "budget": {"maxTrials": 1000, "parallelTrials": 2, "maxSamples": sample_budget},
            "search": {"seed": seed},
            "trial": {"backend": "hf", "engineArgs": {"device": "cpu"}, "timeoutSeconds": 900},
        }
        | {section: value | ({"seed": seed} if section == "search" else {}) for section, value in strategy.items()},
    }


def first_reaching(history, target: float, index: int) -> int | None:
    """Samples used when an incumbent first scored at least `target` (index 2: search score, 3: held-out)."""
    return next((entry[0] for entry in history if entry[index] >= target - 1e-9), None)


def standard_error(score: float, samples: int) -> float:
    """The binomial standard error of a mean accuracy `score` measured on `samples` samples."""
    return math.sqrt(score * (1 - score) / samples)
