"""The search controller on the synthetic executor: promotion, continuation, retries, budgets, resume."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from optuna.trial import TrialState

from mergesearch_operator.search.controller import (
    MAX_SKIPS_IN_A_ROW,
    MAX_SKIPS_PER_RECONCILE,
    SearchController,
    decision_key,
    result_key,
)
from mergesearch_operator.search.hyperband import promotable
from mergesearch_operator.search.objectives import weighted_score
from mergesearch_operator.spaces import DepthwiseIntegration, Skip, build_space
from mergesearch_operator.spaces.baselines import HAND_RECIPES
from mergesearch_operator.spec import parse_manifest
from mergesearch_trial_runner.plan.ir import MergePlan
from tests.search.searches import EXPERTS, FACTS, make_controller, manifest, run_to_end
from tests.search.synthetic import SyntheticExecutor


def evaluated_by_trial(executor: SyntheticExecutor) -> dict[tuple[str, str], list[int]]:
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    for trial, task, index in executor.evaluated:
        seen[(trial, task)].append(index)
    return seen


def test_search_runs_to_the_end_and_reports_the_best(storage, executor):
    controller = make_controller(manifest(), storage, executor)
    status = run_to_end(controller)
    assert status.phase == "Succeeded"
    assert sum(status.trials.values()) == 30
    assert status.trials["completed"] >= 1 and status.trials["pruned"] >= 1
    completed = controller.study.get_trials(states=(TrialState.COMPLETE,))
    assert status.best.value == pytest.approx(max(t.value for t in completed))
    assert set(status.final) == {"best", *(r.label for r in HAND_RECIPES), *(f"expert:{e}" for e in EXPERTS)}


def test_continuation_evaluates_every_sample_once_up_to_the_top_rung_budget(storage, executor):
    controller = make_controller(manifest(), storage, executor)
    run_to_end(controller)
    budgets = controller.schedule.budgets
    seen = evaluated_by_trial(executor)
    for trial in controller.study.get_trials():
        reached = [k for k in range(len(budgets)) if result_key(k) in trial.user_attrs]
        if not reached:
            continue
        for task in EXPERTS:
            indices = seen[(f"synthetic-t{trial.number}", task)]
            assert len(indices) == len(set(indices)), "a sample was evaluated twice"
            assert sorted(indices) == list(range(budgets[max(reached)]))


def test_decisions_follow_asynchronous_successive_halving(storage, executor):
    """With one trial at a time, each decision can be recomputed from the trials before it."""
    controller = make_controller(manifest(budget={"maxTrials": 40, "parallelTrials": 1}), storage, executor)
    run_to_end(controller)
    trials = sorted(controller.study.get_trials(), key=lambda t: t.number)
    weights = controller.objective_weights

    def score(trial, rung):
        counts = defaultdict(lambda: [0, 0])
        for k in range(rung + 1):
            for task, (c, e) in trial.user_attrs.get(result_key(k), {"tasks": {}})["tasks"].items():
                counts[task][0] += c
                counts[task][1] += e
        return weighted_score({t: c / e for t, (c, e) in counts.items()}, weights)

    checked = 0
    for trial in trials:
        for rung in range(controller.schedule.top_rung):
            decision = trial.user_attrs.get(decision_key(rung))
            if decision not in ("promote", "prune"):
                continue
            bracket = trial.user_attrs["bracket"]
            competitors = [
                score(other, rung)
                for other in trials
                if other.number <= trial.number
                and other.user_attrs.get("bracket") == bracket
                and result_key(rung) in other.user_attrs
            ]
            expected = promotable(score(trial, rung), competitors, 3)
            assert (decision == "promote") == expected, (trial.number, rung)
            checked += 1
    assert checked >= 10


def test_initial_design_comes_first(storage, executor):
    controller = make_controller(manifest(budget={"maxTrials": 10}), storage, executor)
    run_to_end(controller)
    first = [t.params for t in sorted(controller.study.get_trials(), key=lambda t: t.number)[:8]]
    design = controller.space.initial_params()
    # three experts alone; linear average, task arithmetic mean and summed, TIES normalised and summed
    assert len(design) == 8
    assert first == design


def test_infrastructure_failures_are_retried_under_a_new_name(storage):
    executor = SyntheticExecutor(fail={"synthetic-t0-r0", "synthetic-t0-r1", "synthetic-t0-r2"})
    controller = make_controller(manifest(budget={"maxTrials": 3}), storage, executor)
    run_to_end(controller)
    trial = controller.study.get_trials()[0]
    retried = [name for name in executor.started if name.startswith("synthetic-t0-")]
    assert any(name.endswith("-a1") for name in retried)
    assert trial.state != TrialState.FAIL  # the retry succeeded
    failures = [v for k, v in trial.user_attrs.items() if k.startswith("failures.")]
    assert failures and failures[0][0]["reason"] == "OOMKilled"


def test_user_errors_are_recorded_and_not_retried(storage):
    bracket_start = {f"synthetic-t{n}-r{r}" for n in range(3) for r in range(3)}
    executor = SyntheticExecutor(fail_user=bracket_start)
    controller = make_controller(manifest(budget={"maxTrials": 3}), storage, executor)
    status = run_to_end(controller)
    assert status.trials["failed"] == 3
    assert not any("-a" in name for name in executor.started)


def test_too_many_failures_stop_the_search(storage):
    everything = {f"synthetic-t{n}-r{r}" for n in range(50) for r in range(3)}
    executor = SyntheticExecutor(fail_user=everything)
    controller = make_controller(manifest(budget={"maxTrials": 50, "maxFailedTrials": 4}), storage, executor)
    status = run_to_end(controller)
    assert status.phase == "Failed"
    assert "maxFailedTrials" in status.message
    assert status.trials["failed"] >= 4 and len({n.split("-r")[0] for n in executor.started}) < 50


def test_a_new_controller_resumes_without_running_anything_twice(storage, executor):
    first = make_controller(manifest(), storage, executor)
    for _ in range(25):  # part of the way, with runs in flight
        first.reconcile()
    assert any(t.state == TrialState.RUNNING for t in first.study.get_trials())
    second = make_controller(manifest(), storage, executor)  # the same storage and runs
    status = run_to_end(second)
    assert status.phase == "Succeeded"
    assert len(executor.started) == len(set(executor.started)), "a run was started twice"
    for indices in evaluated_by_trial(executor).values():
        assert len(indices) == len(set(indices)), "a sample was evaluated twice"
    assert sum(status.trials.values()) == 30


def test_suspend_starts_nothing_and_lets_running_runs_finish(storage, executor):
    controller = make_controller(manifest(), storage, executor)
    for _ in range(3):
        controller.reconcile()
    started = len(executor.started)
    suspended = make_controller(manifest(suspend=True), storage, executor)
    for _ in range(30):
        status = suspended.reconcile()
    assert status.phase == "Suspended"
    assert len(executor.started) == started
    assert status.trials["running"] <= 4


def test_sample_budget_stops_the_search(storage, executor):
    controller = make_controller(manifest(budget={"maxTrials": 200, "maxSamples": 1500}), storage, executor)
    status = run_to_end(controller)
    assert status.phase == "Succeeded"
    # Runs in flight when the budget ran out finish: at most parallelTrials runs of the largest range.
    assert 1500 <= status.samples_used <= 1500 + 4 * 3 * 60
    assert sum(status.trials.values()) < 200
    assert status.message.startswith("done: budget.maxSamples reached (")  # says which budget stopped it


def test_raising_max_trials_continues_a_finished_search(storage, executor):
    first = make_controller(manifest(budget={"maxTrials": 10}), storage, executor)
    assert run_to_end(first).phase == "Succeeded"
    more = make_controller(manifest(budget={"maxTrials": 20}), storage, executor)
    status = run_to_end(more)
    assert sum(status.trials.values()) == 20


def test_pareto_mode_keeps_a_front_and_still_prunes(storage, executor):
    document = manifest(search={"objectiveMode": "pareto"}, budget={"maxTrials": 40})
    controller = make_controller(document, storage, executor)
    status = run_to_end(controller)
    assert status.front and status.hypervolume > 0
    assert status.trials["pruned"] > 0
    assert any(label.startswith("front-") for label in status.final)
    weights = [t.user_attrs["weights"] for t in controller.study.get_trials()]
    assert len({tuple(w) for w in weights}) == len(weights)  # one scalarisation per trial


def test_full_fidelity_mode_runs_every_trial_at_max_samples(storage, executor):
    controller = make_controller(manifest(search={"multiFidelity": False}, budget={"maxTrials": 8}), storage, executor)
    status = run_to_end(controller)
    assert controller.schedule.budgets == (90,)
    assert status.trials["completed"] == 8 and status.samples_used == 8 * 3 * 90


def test_dis_plans_over_the_depth_cap_are_skipped_not_failed(storage, executor):
    document = manifest(budget={"maxTrials": 12})
    document["spec"]["searchSpace"] = {"type": "DIS", "maxDepth": 5}
    controller: SearchController = make_controller(document, storage, executor)
    status = run_to_end(controller)
    assert status.trials["skipped"] > 0 and status.trials["failed"] == 0
    for trial in controller.study.get_trials(states=(TrialState.COMPLETE,)):
        assert controller.space.plan_of(trial.params).num_layers <= 5


class NothingEvaluable(DepthwiseIntegration):
    """A space whose every candidate is skipped, whatever the cause."""

    def suggest(self, trial):
        super().suggest(trial)
        return Skip("too deep")


def test_a_run_of_skipped_candidates_stops_the_search(storage, executor):
    document = manifest(budget={"maxTrials": 12})
    document["spec"]["searchSpace"] = {"type": "DIS"}
    controller: SearchController = make_controller(document, storage, executor)
    controller.space = NothingEvaluable(FACTS)
    status = run_to_end(controller, limit=20)
    assert status.phase == "Failed"
    assert f"the last {MAX_SKIPS_IN_A_ROW} candidates were all skipped (too deep)" in status.message
    assert len(controller.study.get_trials()) <= MAX_SKIPS_IN_A_ROW + MAX_SKIPS_PER_RECONCILE
    assert executor.evaluated == []
    assert controller.reconcile().phase == "Failed"  # and it stays stopped


def test_a_trial_keeps_the_plan_it_was_launched_with_across_rungs(storage, executor):
    """A space whose code changes mid-search (here: other layer groups) changes new candidates only."""
    controller = make_controller(manifest(budget={"maxTrials": 24}), storage, executor)
    for _ in range(3):
        controller.reconcile()
    launched = {t.number for t in controller.study.get_trials() if t.user_attrs.get("ready")}
    changed = manifest(searchSpace={"type": "LFS", "layerGroups": 4, "methods": ["linear", "task_arithmetic", "ties"]})
    controller.space = build_space(parse_manifest(changed).spec, FACTS)
    assert run_to_end(controller).phase == "Succeeded"
    plans: dict[str, set[str]] = defaultdict(set)
    for name, run in executor.runs.items():
        plans[name.split("-r")[0]].add(run["spec"].plan.to_json())
    promoted = [t for t in launched if len(executor_runs(executor, t)) > 1]
    assert promoted, "no trial launched before the change went on to another rung"
    assert all(len(found) == 1 for found in plans.values())  # one plan per trial, whatever its rungs
    for trial in launched:  # still the 2 layer groups they were launched with
        assert all(len(MergePlan.model_validate_json(p).slices) == 2 for p in plans[f"synthetic-t{trial}"])


def executor_runs(executor: SyntheticExecutor, trial: int) -> list[str]:
    return [name for name in executor.runs if name.startswith(f"synthetic-t{trial}-r")]


def test_one_bracket_starts_every_trial_at_the_lowest_rung(storage, executor):
    controller = make_controller(manifest(fidelity={"brackets": 1}, budget={"maxTrials": 20}), storage, executor)
    status = run_to_end(controller)
    trials = controller.study.get_trials()
    assert status.trials["completed"] >= 1
    assert all(result_key(0) in t.user_attrs for t in trials)  # Hyperband would start some higher up
    evaluated = [sum(e for _, e in t.user_attrs[result_key(0)]["tasks"].values()) for t in trials]
    assert set(evaluated) == {3 * controller.schedule.budgets[0]}


@dataclass
class FlakyReleases(SyntheticExecutor):
    """Releases fail at first, as deletes do while the API server is down."""

    failures_left: int = 5
    released: set[str] = field(default_factory=set)

    def release(self, name: str) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            raise ConnectionError("the API server is unavailable")
        self.released.add(name)


def test_a_release_that_failed_is_tried_again_and_nothing_else_is_skipped(storage):
    executor = FlakyReleases()
    controller = make_controller(manifest(budget={"maxTrials": 12}), storage, executor)
    errors = 0
    for _ in range(5000):
        try:
            status = controller.reconcile()
        except ConnectionError:  # what kopf would retry
            errors += 1
            continue
        if status.phase == "Succeeded":
            break
    assert errors > 0 and status.phase == "Succeeded"
    assert set(executor.started) == executor.released  # every finished run was let go, none left behind


@dataclass
class CountingActive(SyntheticExecutor):
    """Counts the runs started and not yet released or cancelled: what would hold a worker pod each."""

    active: set[str] = field(default_factory=set)
    most_active: int = 0

    def start(self, spec):
        if spec.name not in self.runs:
            self.active.add(spec.name)
            self.most_active = max(self.most_active, len(self.active))
        super().start(spec)

    def release(self, name):
        self.active.discard(name)

    def cancel(self, name):
        self.active.discard(name)
        super().cancel(name)


def test_no_more_runs_are_held_at_once_than_parallel_trials_even_in_the_final_stage(storage):
    executor = CountingActive()
    document = manifest()
    document["spec"]["budget"]["parallelTrials"] = 2
    status = run_to_end(make_controller(document, storage, executor))
    assert status.phase == "Succeeded" and len(status.final) > 2
    assert executor.most_active <= 2
