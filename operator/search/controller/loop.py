"""The search loop: `SearchController.reconcile()` drives every trial one step, launches new ones, sweeps
what is no longer live and returns the status (see the package's docstring for the guarantees)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import TrialSpec

from ...executors.base import Executor, RunPhase, RunStatus
from ...spaces import SearchSpace, Skip
from ...spaces.base import ModelFacts
from ...spec import MergeSearchSpec
from ..hyperband import Schedule, promotable
from ..objectives import chebyshev, parego_weights, weighted_score
from ..phases import Decision, Phase
from ..storage import SingleWriterStorage
from .acts import DeferredActs
from .final import FINAL, FinalStage
from .records import StudyRecords
from .status import SearchStatus, summarize
from .trials import (
    BRACKET,
    INTERRUPTED,
    PLAN,
    READY,
    SKIPPED,
    STOPPED,
    WEIGHTS,
    Asked,
    TrialView,
    accuracies,
    decision_key,
    failures_key,
    result_key,
    skips_in_a_row,
    usage,
)

log = logging.getLogger(__name__)

INITIALIZED = "initialized"
MAX_SKIPS_PER_RECONCILE = 50
# Skipped candidates in a row that stop the search: the sampler has found nothing it may evaluate. Even
# DIS's default depth cap, where about 5 in 6 random stacks are too deep, skips 200 in a row with
# probability below 1e-15.
MAX_SKIPS_IN_A_ROW = 200


class SearchObserver:
    """Told of events as they happen (metrics count them); every method does nothing by default."""

    def run_finished(self, *, rung: int | None, seconds: float) -> None:
        """A run's result was recorded (`rung` None: a final-stage run)."""

    def run_failed(self, *, cause: str) -> None:
        """A run failed; `cause` is one of `executors.base.CAUSES`."""


class SearchController:
    def __init__(
        self,
        *,
        name: str,
        spec: MergeSearchSpec,
        study: optuna.Study,
        space: SearchSpace,
        facts: ModelFacts,
        executor: Executor,
        storage: SingleWriterStorage,
        observer: SearchObserver | None = None,
    ):
        self.name = name
        self.observer = observer or SearchObserver()
        self.records = StudyRecords(study, storage)
        self.spec = spec
        self.study = study  # for readers (the report, the CLI, tests); the controller goes through records
        self.space = space
        self.facts = facts
        self.executor = executor
        self.acts = DeferredActs(self.records, executor)
        self.final = FinalStage(self)
        self._final_runs_pending: set[str] = set()
        fidelity = spec.fidelity
        self.schedule = (
            Schedule.build(fidelity.min_samples, fidelity.max_samples, fidelity.reduction_factor, fidelity.brackets)
            if spec.search.multi_fidelity
            else Schedule.single_fidelity(fidelity.max_samples)
        )
        self.objective_weights = {o.name: o.weight for o in spec.objectives}
        self.pareto = spec.search.objective_mode == "pareto"
        self.tasks = [o.task() for o in spec.objectives]

    # --- names and specs ------------------------------------------------------------------------------

    def run_name(self, trial: int, rung: int, attempt: int) -> str:
        return f"{self.name}-t{trial}-r{rung}" + (f"-a{attempt}" if attempt else "")

    def trial_spec(
        self, name: str, plan: MergePlan, *, rung: int | None, bracket: int = 0, output_uri: str | None = None
    ) -> TrialSpec:
        ranges = {}
        if rung is not None:
            ranges = {task.name: self.schedule.sample_range(rung, bracket) for task in self.tasks}
        return TrialSpec(
            name=name,
            plan=plan,
            tasks=self.tasks,
            split="search" if rung is not None else "test",
            ranges=ranges,
            backend=self.spec.trial.backend,
            engine_args=self.spec.trial.engine_args,
            output_uri=output_uri,
        )

    def plan(self, trial: FrozenTrial) -> MergePlan:
        """The plan the trial was launched with: stored then, so that a change of the space's code cannot
        change a trial between its rungs (trials of studies from before that are rebuilt from parameters)."""
        stored = trial.user_attrs.get(PLAN)
        if stored is not None:
            return MergePlan.model_validate(stored)
        plan = self.space.plan_of(dict(trial.params))
        assert not isinstance(plan, Skip), "a launched trial's plan cannot be skipped"
        return plan

    # --- scores ---------------------------------------------------------------------------------------

    def _objective_values(self, counts: Mapping[str, tuple[int, int]]) -> list[float]:
        acc = accuracies(counts)
        return [acc.get(task.name, 0.0) for task in self.tasks]

    def _score(self, view: TrialView, rung: int, weights: list[float] | None) -> float:
        """The number that ranks trials at a rung: the weighted mean, or a Chebyshev scalarisation.

        Kept on the view: every decision at a rung ranks its bracket's other trials there."""
        key = (rung, None if weights is None else tuple(weights))
        if key not in view.scores:
            values = self._objective_values(view.counts(rung))
            if weights is None:
                names = [t.name for t in self.tasks]
                view.scores[key] = weighted_score(dict(zip(names, values, strict=True)), self.objective_weights)
            else:
                view.scores[key] = chebyshev(values, weights)
        return view.scores[key]

    def _weights_of(self, view: TrialView) -> list[float] | None:
        return view.attrs.get(WEIGHTS) if self.pareto else None

    # --- the loop -------------------------------------------------------------------------------------

    def reconcile(self) -> SearchStatus:
        self._initialize()
        views = [TrialView(t, self.schedule) for t in self.records.trials()]
        self._final_runs_pending = set()
        status = self._step(views)
        self._sweep(views)
        return status

    def _sweep(self, views: list[TrialView]) -> None:
        """Level-triggered cleanup: let go of every run the executor holds that the study does not say is
        live (finished, superseded by a retry, or unknown). Releases right after a decision can be lost
        with the process that made it (a crash between the commit and the delete); this finds them at the
        next reconcile, after a restart too. A failure here is logged and tried again at the next one."""
        live = set(self._final_runs_pending)
        for view in views:
            if view.state == TrialState.RUNNING and view.attrs.get(READY):
                rung = view.rung
                live.add(self.run_name(view.number, rung, len(view.failures(rung))))
        try:
            self.executor.sweep(live)
        except Exception as error:  # the next reconcile sweeps again
            log.warning("sweeping runs that are no longer live failed: %r", error)

    def _step(self, views: list[TrialView]) -> SearchStatus:
        """Store what the runs report, decide, act and launch; the status after that."""
        used = usage(views, self.executor.accelerators_per_run)
        failed = sum(1 for v in views if v.state == TrialState.FAIL)
        if failed >= self.spec.budget.max_failed_trials:
            with self.acts.transaction():
                self._stop_running(views, reason=f"{failed} trials failed (budget.maxFailedTrials)")
            return self._status(Phase.FAILED, f"stopped: {failed} trials failed, budget.maxFailedTrials reached", views)

        skipped, reason = skips_in_a_row(views)
        if skipped >= MAX_SKIPS_IN_A_ROW:
            message = (
                f"stopped: the last {skipped} candidates were all skipped ({reason}); the search space leaves "
                "almost nothing to evaluate, widen it (for DIS, raise searchSpace.maxDepth)"
            )
            with self.acts.transaction():
                self._stop_running(views, reason=message)
            return self._status(Phase.FAILED, message, views)

        spent = self._spent(used)  # which budget is used up ('' while none is)
        exhausted = bool(spent)
        launching = not self.spec.suspend
        in_flight = 0
        with self.acts.transaction():
            for view in views:
                if view.state == TrialState.RUNNING:
                    in_flight += self._drive(view, views, launching=launching, exhausted=exhausted)

            started = sum(
                1
                for v in views
                if not (v.attrs.get(SKIPPED) or v.attrs.get(INTERRUPTED)) and v.state != TrialState.WAITING
            )
            # Runs that finished in this reconcile count at once: their use may just have spent a budget.
            spent = spent or self._spent(usage(views, self.executor.accelerators_per_run))
            exhausted = bool(spent)
            more_trials = started < self.spec.budget.max_trials and not exhausted
            skips = 0
            while launching and more_trials and in_flight < self.spec.budget.parallel_trials:
                if self._launch_new(views):
                    started += 1
                    in_flight += 1
                else:
                    skips += 1
                    if skips >= MAX_SKIPS_PER_RECONCILE:  # the sampler keeps proposing stacks over the cap
                        break
                more_trials = started < self.spec.budget.max_trials

        if in_flight:
            phase = Phase.RUNNING if launching else Phase.SUSPENDED
            return self._status(phase, self._progress_message(spent), views)
        if more_trials:
            phase = Phase.SUSPENDED if not launching else Phase.RUNNING
            return self._status(phase, self._progress_message(spent), views)
        phase, message, self._final_runs_pending = self.final.advance(launching=launching, spent=spent)
        return self._status(phase, message)

    def _initialize(self) -> None:
        if self.records.attrs.get(INITIALIZED):
            return
        for params in self.space.initial_params():
            self.records.enqueue(params)
        self.records.set_attr(INITIALIZED, True)

    def _spent(self, used: tuple[int, float]) -> str:
        """The budget that is used up, named as the user writes it, with its use; '' while none is."""
        samples, device_seconds = used
        budget = self.spec.budget
        if budget.max_samples is not None and samples >= budget.max_samples:
            return f"budget.maxSamples reached ({samples} of {budget.max_samples} samples evaluated)"
        if budget.max_gpu_seconds is not None and device_seconds >= budget.max_gpu_seconds:
            return (
                f"budget.maxGpuSeconds reached ({device_seconds:.0f} of {budget.max_gpu_seconds:g} "
                "accelerator-seconds used)"
            )
        return ""

    def _launch_new(self, views: list[TrialView]) -> bool:
        """Ask Optuna for a candidate and start its first run; False when the candidate is skipped."""
        trial = self.records.ask()
        bracket = self.schedule.bracket_of(trial.number, salt=self.name)
        attrs: dict[str, Any] = {BRACKET: bracket}
        if self.pareto:
            attrs[WEIGHTS] = parego_weights(trial.number, len(self.tasks), self.spec.search.seed)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        plan = self.space.suggest(trial)
        if isinstance(plan, Skip):
            trial.set_user_attr(SKIPPED, plan.reason)
            self.records.tell(trial, TrialState.PRUNED)
            views.append(
                TrialView(Asked(trial.number, TrialState.PRUNED, {**attrs, SKIPPED: plan.reason}), self.schedule)
            )
            return False
        trial.set_user_attr(PLAN, plan.model_dump(mode="json"))
        trial.set_user_attr(READY, True)  # with the parameters, in the same transaction: a complete trial
        name = self.run_name(trial.number, bracket, 0)
        self.acts.start(self.trial_spec(name, plan, rung=bracket, bracket=bracket))
        views.append(TrialView(Asked(trial.number, TrialState.RUNNING, {**attrs, READY: True}), self.schedule))
        return True

    def _tell(self, view: TrialView, state: TrialState, values: float | list[float] | None = None) -> None:
        self.records.tell(view.number, state, values)
        view.told = state

    def _store(self, view: TrialView, key: str, value: Any) -> None:
        self.records.set_trial_attr(view.number, key, value)
        view.stored[key] = value

    def _drive(self, view: TrialView, views: list[TrialView], *, launching: bool, exhausted: bool) -> int:
        """Move one running trial forward; return 1 if it still has a run in flight, else 0."""
        if not view.attrs.get(READY):
            # The controller stopped between asking and launching: the parameters may be incomplete.
            self._store(view, INTERRUPTED, "the controller stopped before this trial was launched")
            self._tell(view, TrialState.PRUNED)
            return 0
        rung = view.rung
        decision = view.decision(rung)
        if decision is not None and not (decision == Decision.PROMOTE and rung < self.schedule.top_rung):
            self._act(view, rung, decision)
            return 0
        if view.result(rung) is not None:
            decision = self._decide(view, views, rung, exhausted)
            self._store(view, decision_key(rung), decision)
            if decision != Decision.PROMOTE:
                self._act(view, rung, decision)
                return 0
            rung += 1
        attempt = len(view.failures(rung))
        name = self.run_name(view.number, rung, attempt)
        status = self.executor.poll(name)
        if status.phase is RunPhase.MISSING:
            if not launching:
                return 0
            self.acts.start(self.trial_spec(name, self.plan(view.trial), rung=rung, bracket=view.bracket))
            return 1
        if status.phase is RunPhase.RUNNING:
            return 1
        if status.phase is RunPhase.SUCCEEDED:
            self._record_result(view, rung, status)
            decision = self._decide(view, views, rung, exhausted)
            self._store(view, decision_key(rung), decision)
            self.acts.release(name)
            if decision != Decision.PROMOTE:
                self._act(view, rung, decision)
                return 0
            return self._drive(view, views, launching=launching, exhausted=exhausted)  # starts the next rung
        return self._record_failure(view, rung, name, status, launching=launching)

    def _record_result(self, view: TrialView, rung: int, status: RunStatus) -> None:
        assert status.result is not None
        expected = self.schedule.sample_range(rung, view.bracket)
        for task in self.tasks:
            got = status.result.ranges.get(task.name)
            if got is not None and tuple(got) != expected:
                raise RuntimeError(f"run for trial {view.number} rung {rung} evaluated {got}, expected {expected}")
        record = {
            "tasks": {t: [c.correct, c.evaluated] for t, c in status.result.tasks.items()},
            "seconds": status.seconds,
            "at": time.time(),
        }
        self._store(view, result_key(rung), record)
        self.observer.run_finished(rung=rung, seconds=status.seconds)
        if not self.pareto:  # a learning curve for the dashboard, and what TPE ranks pruned trials by
            score = self._score(view, rung, None)
            self.records.report(view.number, self.schedule.budgets[rung], score)

    def _record_failure(self, view: TrialView, rung: int, name: str, status: RunStatus, *, launching: bool) -> int:
        failure = {
            "run": name,
            "kind": status.failure,
            "cause": status.cause,
            "reason": status.reason[:500],
            "seconds": status.seconds,
        }
        self.observer.run_failed(cause=status.cause or "Error")
        failures = [*view.failures(rung), failure]
        self._store(view, failures_key(rung), failures)
        self.acts.release(name)
        if status.failure == "user" or len(failures) > self.spec.budget.max_retries:
            log.warning("trial %d failed at rung %d: %s", view.number, rung, status.reason)
            self._tell(view, TrialState.FAIL)
            return 0
        if not launching:
            return 0
        retry = self.run_name(view.number, rung, len(failures))
        self.acts.start(self.trial_spec(retry, self.plan(view.trial), rung=rung, bracket=view.bracket))
        return 1

    def _decide(self, view: TrialView, views: list[TrialView], rung: int, exhausted: bool) -> Decision:
        if rung == self.schedule.top_rung:
            return Decision.COMPLETE
        if exhausted:
            return Decision.STOP
        weights = self._weights_of(view)
        value = self._score(view, rung, weights)
        competitors = [
            self._score(other, rung, weights)
            for other in views
            if other.bracket == view.bracket and other.result(rung) is not None
        ]
        return Decision.PROMOTE if promotable(value, competitors, self.schedule.reduction_factor) else Decision.PRUNE

    def _act(self, view: TrialView, rung: int, decision: Decision) -> None:
        if decision == Decision.COMPLETE:
            values = self._objective_values(view.counts(rung))
            self._tell(view, TrialState.COMPLETE, values if self.pareto else self._score(view, rung, None))
        else:  # prune, stop, or a promotion past the top (cannot happen) end the trial as pruned
            if decision == Decision.STOP:
                self._store(view, STOPPED, "sample or device-time budget exhausted")
            self._tell(view, TrialState.PRUNED)

    def _stop_running(self, views: list[TrialView], reason: str) -> None:
        for view in views:
            if view.state != TrialState.RUNNING:
                continue
            if view.attrs.get(READY):
                rung = view.rung
                self.acts.cancel(self.run_name(view.number, rung, len(view.failures(rung))))
            self._store(view, STOPPED, reason)
            self._tell(view, TrialState.PRUNED)

    def _progress_message(self, spent: str) -> str:
        if self.spec.suspend:
            return "suspended: no new trial runs start; running ones finish"
        if spent:
            return f"{spent}: finishing running trials"
        return "searching"

    # --- status ---------------------------------------------------------------------------------------

    def status(self) -> SearchStatus:
        """The search's status as stored, without driving anything (for `mergesearch status`)."""
        phase = Phase(self.records.attrs.get("phase", Phase.PENDING))
        return self._status(phase, self.records.attrs.get("message", ""), persist=False)

    def _status(
        self, phase: Phase, message: str, views: list[TrialView] | None = None, *, persist: bool = True
    ) -> SearchStatus:
        """The status from `views` (this reconcile's, kept current as it went), or read afresh; stored with
        the study (phase and message) unless `persist` is off."""
        if views is None:
            views = [TrialView(t, self.schedule) for t in self.records.trials()]
        attrs = self.records.attrs
        status = summarize(
            views,
            phase,
            message,
            schedule=self.schedule,
            objectives=self.objective_weights,
            pareto=self.pareto,
            accelerators_per_run=self.executor.accelerators_per_run,
            final=attrs.get(FINAL, {}),
        )
        if persist and (attrs.get("phase"), attrs.get("message")) != (phase, message):
            self.records.set_attr("phase", phase)
            self.records.set_attr("message", message)
        return status
