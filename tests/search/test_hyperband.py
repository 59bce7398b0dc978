"""Rung budgets, brackets and the promotion rule, computed exactly."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from mergesearch_operator.search.hyperband import Schedule, promotable


@pytest.mark.parametrize(
    ("low", "high", "eta", "budgets"),
    [
        (100, 1000, 3, (100, 300, 1000)),  # the paper's setting: three brackets
        (1, 243, 3, (1, 3, 9, 27, 81, 243)),  # an exact power of eta
        (1, 1000, 10, (1, 10, 100, 1000)),
        (100, 150, 3, (150,)),  # not even one halving fits: full fidelity only
        (50, 50, 2, (50,)),
    ],
)
def test_rung_budgets_are_exact(low, high, eta, budgets):
    assert Schedule.build(low, high, eta).budgets == budgets


def test_optunas_floating_point_log_drops_a_bracket_we_keep():
    # What optuna.pruners.HyperbandPruner computes for its bracket count: one short for 1 -> 243.
    optuna_brackets = math.floor(math.log(243 / 1, 3)) + 1
    assert optuna_brackets == 5
    assert Schedule.build(1, 243, 3).rungs == 6


def test_sample_ranges_continue_without_overlap():
    schedule = Schedule.build(100, 1000, 3)
    ranges = [schedule.sample_range(r) for r in range(schedule.rungs)]
    assert ranges == [(0, 100), (100, 300), (300, 1000)]


def test_brackets_follow_hyperbands_allocation_and_are_stable():
    schedule = Schedule.build(100, 1000, 3)
    assert schedule.bracket_weights() == [9, 5, 3]  # ceil(3 * 3**s / (s + 1)) for s = 2, 1, 0
    assignment = [schedule.bracket_of(n, salt="s") for n in range(3000)]
    assert assignment == [schedule.bracket_of(n, salt="s") for n in range(3000)]  # deterministic
    share = Counter(assignment)
    for bracket, weight in enumerate(schedule.bracket_weights()):
        assert abs(share[bracket] / 3000 - weight / 17) < 0.03


def test_promotion_keeps_the_top_third():
    values = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert [promotable(v, values, 3) for v in values] == [True, True, False, False, False, False]


def test_the_first_arrivals_are_promoted_optimistically():
    assert promotable(0.1, [0.1], 3)  # alone at its rung
    assert not promotable(0.1, [0.1, 0.5], 3)  # two: only the best
    assert promotable(0.5, [0.1, 0.5], 3)


@pytest.mark.parametrize(
    ("max_brackets", "weights"), [(1, [27]), (2, [27, 12]), (4, [27, 12, 6, 4]), (9, [27, 12, 6, 4])]
)
def test_max_brackets_keeps_the_most_aggressive_brackets(max_brackets, weights):
    schedule = Schedule.build(20, 540, 3, max_brackets)
    assert schedule.bracket_weights() == weights
    assert {schedule.bracket_of(n) for n in range(500)} == set(range(len(weights)))
