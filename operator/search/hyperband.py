"""Hyperband over evaluation samples, with asynchronous promotion that continues trials.

Rungs are sample counts per objective: `minSamples * eta**i` below `maxSamples`, then `maxSamples`
itself, found with integer arithmetic (Optuna's HyperbandPruner takes a floating-point logarithm that
drops a bracket when max/min is an exact power of eta, e.g. 1 -> 243 with eta = 3). Bracket `b` starts
its trials at rung `b`, so bracket 0 is the most aggressive and the last bracket runs every trial at
full fidelity. Trials are spread over brackets in proportion to Hyperband's allocation, by a hash of the
trial number (deterministic across restarts). `fidelity.brackets` keeps only the most aggressive
brackets: Hyperband's later brackets hedge against a lowest rung too noisy to rank by, at the price of
screening fewer candidates; with 1 (the default, which the benchmarks chose), every trial starts at the
lowest rung (plain ASHA).

Promotion is asynchronous successive halving (ASHA): when a trial's rung result arrives it is promoted
if it is in the top 1/eta of the trials of its bracket that have reached that rung so far (the first
arrivals are promoted optimistically), and no bracket ever waits for its slowest trial. A promoted trial
continues: its next run evaluates only samples `[budget[k], budget[k + 1])` and the counts are added,
so a trial's evaluated samples always equal its top rung's budget.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    budgets: tuple[int, ...]  # samples per objective at each rung, strictly increasing
    reduction_factor: int
    max_brackets: int | None = None  # run only the most aggressive brackets; None: all of them

    @classmethod
    def build(
        cls, min_samples: int, max_samples: int, reduction_factor: int, max_brackets: int | None = None
    ) -> Schedule:
        if not 1 <= min_samples <= max_samples or reduction_factor < 2:
            raise ValueError("need 1 <= min_samples <= max_samples and reduction_factor >= 2")
        if max_brackets is not None and max_brackets < 1:
            raise ValueError("need max_brackets >= 1")
        budgets = []
        budget = min_samples
        while budget * reduction_factor <= max_samples:  # exact: integers only
            budgets.append(budget)
            budget *= reduction_factor
        budgets.append(max_samples)  # the top rung is maxSamples exactly, whatever eta's powers give
        return cls(tuple(budgets), reduction_factor, max_brackets)

    @classmethod
    def single_fidelity(cls, samples: int) -> Schedule:
        return cls((samples,), 2)

    @property
    def rungs(self) -> int:
        return len(self.budgets)

    @property
    def top_rung(self) -> int:
        return len(self.budgets) - 1

    def sample_range(self, rung: int, first_rung: int = 0) -> tuple[int, int]:
        """The samples a run at `rung` evaluates, for a trial that started at `first_rung` (its bracket):
        everything up to the rung's budget on its first run, then only what it has not seen yet."""
        return (self.budgets[rung - 1] if rung > first_rung else 0, self.budgets[rung])

    def bracket_weights(self) -> list[int]:
        """Hyperband's trial allocation per bracket: ceil(n * eta**s / (s + 1)), s rungs of halving; only
        the first `max_brackets` brackets get trials (one: asynchronous successive halving, ASHA)."""
        brackets = self.rungs
        weights = []
        for bracket in range(min(brackets, self.max_brackets or brackets)):
            halvings = brackets - 1 - bracket
            weights.append(math.ceil(brackets * self.reduction_factor**halvings / (halvings + 1)))
        return weights

    def bracket_of(self, trial_number: int, salt: str = "") -> int:
        weights = self.bracket_weights()
        digest = hashlib.blake2b(f"{salt}:{trial_number}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "little") % sum(weights)
        for bracket, weight in enumerate(weights):
            if point < weight:
                return bracket
            point -= weight
        raise AssertionError("unreachable")


def promotable(value: float, competitors: Sequence[float], reduction_factor: int) -> bool:
    """Whether `value` is in the top 1/eta of `competitors` (which include it); the best is always in."""
    ranked = sorted(competitors, reverse=True)
    keep = max(1, len(ranked) // reduction_factor)
    return value >= ranked[keep - 1]
