"""Scores from counts, and the multi-objective machinery: scalarisation, Pareto front, hypervolume.

Every objective is an accuracy in [0, 1], maximised. Weighted mode maximises the weighted mean. Pareto
mode keeps the non-dominated trials; pruning still needs one number per trial, so each trial draws its
own weight vector (seeded by its number, uniform on the simplex) and every comparison made for it
scalarises all competitors with that vector by the augmented Chebyshev function - ParEGO's device, so
that over many trials every direction of the front gets explored.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

CHEBYSHEV_RHO = 0.05


def weighted_score(accuracies: Mapping[str, float], weights: Mapping[str, float]) -> float:
    total = sum(weights.values())
    return sum(weights[name] * accuracies[name] for name in weights) / total


def held_out_scores(final: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]) -> dict[str, float]:
    """Label -> weighted held-out accuracy of each merge the final stage scored (a missing task counts 0)."""
    return {label: weighted_score({o: scores.get(o, 0.0) for o in weights}, weights) for label, scores in final.items()}


def parego_weights(trial_number: int, objectives: int, seed: int = 0) -> list[float]:
    rng = random.Random(f"parego:{seed}:{trial_number}")
    draws = [rng.expovariate(1.0) for _ in range(objectives)]
    total = sum(draws)
    return [d / total for d in draws]


def chebyshev(values: Sequence[float], weights: Sequence[float], rho: float = CHEBYSHEV_RHO) -> float:
    """Augmented Chebyshev scalarisation for maximisation: higher is better."""
    weighted = [w * v for w, v in zip(weights, values, strict=True)]
    return min(weighted) + rho * sum(weighted)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (duplicates keep their first occurrence)."""
    front = []
    for i, p in enumerate(points):
        if any(dominates(q, p) for j, q in enumerate(points) if j != i):
            continue
        if any(tuple(points[j]) == tuple(p) for j in front):
            continue
        front.append(i)
    return front


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Volume dominated by `points` and bounded below by `reference` (maximisation), by slicing."""
    relevant = [tuple(p) for p in points if all(x > r for x, r in zip(p, reference, strict=True))]
    if not relevant:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in relevant) - reference[0]
    # Slice along the last objective: between consecutive levels, the points at or above the level
    # dominate a (d-1)-dimensional volume.
    levels = sorted({p[-1] for p in relevant}, reverse=True)
    volume = 0.0
    for index, level in enumerate(levels):
        below = levels[index + 1] if index + 1 < len(levels) else reference[-1]
        members = [p[:-1] for p in relevant if p[-1] >= level]
        volume += hypervolume(members, reference[:-1]) * (level - below)
    return volume
