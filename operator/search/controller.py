"""The search loop: Optuna asks, spaces build plans, executors run them, Hyperband promotes or prunes.

It knows nothing of Kubernetes. `reconcile()` is level-based and idempotent: it reads the study and the
executor's runs, moves every trial one step towards done, launches new work up to `parallelTrials`, and
returns the status. Call it again and again (a loop locally, a timer and pod events on a cluster); after
a crash, a new controller on the same study and executor carries on, because every fact it acts on is
stored before it acts:

1. a finished run's counts are stored on its trial (`result.r<k>`) with the decision they lead to
   (`decision.r<k>`: promote, complete, prune or stop) and, unless promoted, the trial's end; then the
   run is released and a promotion starts the next rung's run (idempotent by its deterministic name).
   A decision found stored but not acted on is acted on again (telling Optuna is idempotent with
   skip_if_finished);
2. a failed run is stored (`failures.r<k>`) and retried under a new name (`-a<n>`) while retries last.

So no run is started twice and no counted sample is evaluated again. Trial runs write nothing to the
study: the controller alone tells Optuna. A reconcile stores what it learns and decides (results,
decisions, new trials) in one database transaction and only then acts on runs (`_store_then_act`):
with many trials in flight, one transaction per reconcile instead of a few per trial.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import TrialSpec

from ..executors.base import Executor, RunPhase, RunStatus
from ..spaces import SearchSpace, Skip
from ..spaces.base import ModelFacts
from ..spaces.baselines import baselines
from ..spec import MergeSearchSpec
from .hyperband import Schedule, promotable
from .objectives import chebyshev, hypervolume, parego_weights, pareto_front, weighted_score
from .phases import Decision, Phase
from .storage import SingleWriterStorage

log = logging.getLogger(__name__)

BRACKET = "bracket"
READY = "ready"
PLAN = "plan"
SKIPPED = "skipped"
STOPPED = "stopped"
INTERRUPTED = "interrupted"
MAX_SKIPS_PER_RECONCILE = 50
# Skipped candidates in a row that stop the search: the sampler has found nothing it may evaluate. Even
# DIS's default depth cap, where about 5 in 6 random stacks are too deep, skips 200 in a row with
# probability below 1e-15.
MAX_SKIPS_IN_A_ROW = 200
WEIGHTS = "weights"
INITIALIZED = "initialized"
FRONT_SIZE_IN_STATUS = 10


def result_key(rung: int) -> str:
    return f"result.r{rung}"


def decision_key(rung: int) -> str:
    return f"decision.r{rung}"


def failures_key(rung: int) -> str:
    return f"failures.r{rung}"


@dataclass(frozen=True)
class Best:
    """The best trial so far by the weighted score (in pareto mode too), with its search-split accuracies."""

    trial: int
    value: float
    objectives: dict[str, float]


@dataclass
class SearchStatus:
    """What the search looks like now; small whatever the number of trials."""

    phase: Phase
    message: str = ""
    trials: dict[str, int] = field(default_factory=dict)  # running, completed, pruned, failed, skipped
    rungs: list[int] = field(default_factory=list)  # rung results recorded, per rung
    running_per_rung: list[int] = field(default_factory=list)
    samples_used: int = 0
    device_seconds: float = 0.0
    best: Best | None = None
    front: list[dict[str, Any]] = field(default_factory=list)  # top of the Pareto front
    hypervolume: float | None = None
    final: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> objective -> test accuracy
    budgets: list[int] = field(default_factory=list)


@dataclass
class _Asked:
    """What this reconcile knows of a trial it has just asked for (instead of reading it back)."""

    number: int
    state: TrialState
    user_attrs: dict[str, Any]


@dataclass
class _TrialView:
    """A trial's stored facts, read from its attributes (plus what this reconcile has stored since)."""

    trial: FrozenTrial | _Asked
    schedule: Schedule
    stored: dict[str, Any] = field(default_factory=dict)
    told: TrialState | None = None  # what this reconcile told Optuna, not yet in `trial`
    scores: dict[tuple[int, tuple[float, ...] | None], float] = field(default_factory=dict)  # see `_score`

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def state(self) -> TrialState:
        return self.told or self.trial.state

    @property
    def attrs(self) -> Mapping[str, Any]:
        return ChainMap(self.stored, self.trial.user_attrs)

    @functools.cached_property
    def bracket(self) -> int:  # set when the trial is asked, never changed
        return int(self.attrs.get(BRACKET, 0))

    def result(self, rung: int) -> dict[str, Any] | None:
        return self.attrs.get(result_key(rung))

    def decision(self, rung: int) -> Decision | None:
        stored = self.attrs.get(decision_key(rung))
        return None if stored is None else Decision(stored)

    def failures(self, rung: int) -> list[dict[str, Any]]:
        return list(self.attrs.get(failures_key(rung), []))

    @property
    def rung(self) -> int:
        """The rung in flight (or the last one, once decided)."""
        rung = self.bracket
        while self.decision(rung) == Decision.PROMOTE and rung < self.schedule.top_rung:
            rung += 1
        return rung

    def counts(self, up_to: int) -> dict[str, tuple[int, int]]:
        """(correct, evaluated) per task over every rung up to `up_to`."""
        total: dict[str, tuple[int, int]] = {}
        for rung in range(self.bracket, up_to + 1):
            result = self.result(rung)
            if result is None:
                continue
            for task, (correct, evaluated) in result["tasks"].items():
                c, e = total.get(task, (0, 0))
                total[task] = (c + correct, e + evaluated)
        return total

    def samples_used(self) -> int:
        return sum(
            e for rung in range(self.schedule.rungs) for _, e in (self.result(rung) or {"tasks": {}})["tasks"].values()
        )

    def seconds(self) -> float:
        total = 0.0
        for rung in range(self.schedule.rungs):
            result = self.result(rung)
            total += result["seconds"] if result else 0.0
            total += sum(f.get("seconds", 0.0) for f in self.failures(rung))
        return total


def _skips_in_a_row(views: list[_TrialView]) -> tuple[int, str]:
    """How many of the latest asked candidates were skipped, and the last one's reason."""
    count, reason = 0, ""
    for view in reversed(views):
        if view.state == TrialState.WAITING:
            continue
        if not view.attrs.get(SKIPPED):
            break
        count, reason = count + 1, reason or view.attrs[SKIPPED]
    return count, reason


def accuracies(counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    return {task: (c / e if e else 0.0) for task, (c, e) in counts.items()}


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
        self.storage = storage  # for reporting rung scores on trials asked by an earlier controller
        self._deferred_acts: list[tuple[Callable[[], None], bool]] | None = None
        self._cleanups_to_retry: list[Callable[[], None]] = []
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self._trial_ids: dict[int, int] = {}
        self.spec = spec
        self.study = study
        self.space = space
        self.facts = facts
        self.executor = executor
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

    def _trial_spec(
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

    def _plan(self, trial: FrozenTrial) -> MergePlan:
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

    def _score(self, view: _TrialView, rung: int, weights: list[float] | None) -> float:
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

    def _weights_of(self, view: _TrialView) -> list[float] | None:
        return view.attrs.get(WEIGHTS) if self.pareto else None

    # --- the loop -------------------------------------------------------------------------------------

    def reconcile(self) -> SearchStatus:
        self._initialize()
        views = [_TrialView(t, self.schedule) for t in self.study.get_trials(deepcopy=False)]
        self._final_runs_pending: set[str] = set()
        status = self._step(views)
        self._sweep(views)
        return status

    def _sweep(self, views: list[_TrialView]) -> None:
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

    def _step(self, views: list[_TrialView]) -> SearchStatus:
        """Store what the runs report, decide, act and launch; the status after that."""
        usage = self._usage(views)
        failed = sum(1 for v in views if v.state == TrialState.FAIL)
        if failed >= self.spec.budget.max_failed_trials:
            with self._store_then_act():
                self._stop_running(views, reason=f"{failed} trials failed (budget.maxFailedTrials)")
            return self._status(Phase.FAILED, f"stopped: {failed} trials failed, budget.maxFailedTrials reached", views)

        skipped, reason = _skips_in_a_row(views)
        if skipped >= MAX_SKIPS_IN_A_ROW:
            message = (
                f"stopped: the last {skipped} candidates were all skipped ({reason}); the search space leaves "
                "almost nothing to evaluate, widen it (for DIS, raise searchSpace.maxDepth)"
            )
            with self._store_then_act():
                self._stop_running(views, reason=message)
            return self._status(Phase.FAILED, message, views)

        spent = self._spent(usage)  # which budget is used up ('' while none is)
        exhausted = bool(spent)
        launching = not self.spec.suspend
        in_flight = 0
        with self._store_then_act():
            for view in views:
                if view.state == TrialState.RUNNING:
                    in_flight += self._drive(view, views, launching=launching, exhausted=exhausted)

            started = sum(
                1
                for v in views
                if not (v.attrs.get(SKIPPED) or v.attrs.get(INTERRUPTED)) and v.state != TrialState.WAITING
            )
            # Runs that finished in this reconcile count at once: their use may just have spent a budget.
            spent = spent or self._spent(self._usage(views))
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
        return self._finalize(launching, spent)

    @contextlib.contextmanager
    def _store_then_act(self) -> Iterator[None]:
        """Writes in this block reach the database in one transaction; the runs it starts, releases and
        cancels (`_start_run`, `_release_run`, `_cancel_run`) are acted on after that commits, so that
        nothing outside acts on a fact the database does not hold (a run deleted before its failure is
        stored would be started again under the same name after a crash). After an exception nothing is
        acted on: the next reconcile finds the stored facts and acts then (starting a run is idempotent by
        name). Every act is tried even when one fails (then the first error is raised); a release or
        cancel that failed is tried again after the next commit, since nothing else would: the controller
        is done with that run, which would otherwise be left behind (a pod never deleted). A start needs
        no retry: a run never started is missing at its next poll and started then."""
        acts: list[tuple[Callable[[], None], bool]] = []  # (act, whether it is a release or cancel)
        self._deferred_acts = acts
        try:
            with self.storage.in_one_transaction():
                yield
        finally:
            self._deferred_acts = None
        retries, self._cleanups_to_retry = self._cleanups_to_retry, []
        errors = []
        for act, cleanup in [*((retry, True) for retry in retries), *acts]:
            try:
                act()
            except Exception as error:  # every act is tried; the first error is raised below
                errors.append(error)
                if cleanup:
                    self._cleanups_to_retry.append(act)
        for error in errors[1:]:
            log.warning("acting on the stored facts also failed: %r", error)
        if errors:
            raise errors[0]

    def _start_run(self, spec: TrialSpec) -> None:
        assert self._deferred_acts is not None, "runs are started from inside _store_then_act"
        self._deferred_acts.append((functools.partial(self.executor.start, spec), False))

    def _release_run(self, name: str) -> None:
        assert self._deferred_acts is not None, "runs are released from inside _store_then_act"
        self._deferred_acts.append((functools.partial(self.executor.release, name), True))

    def _cancel_run(self, name: str) -> None:
        assert self._deferred_acts is not None, "runs are cancelled from inside _store_then_act"
        self._deferred_acts.append((functools.partial(self.executor.cancel, name), True))

    def _initialize(self) -> None:
        if self.study.user_attrs.get(INITIALIZED):
            return
        for params in self.space.initial_params():
            self.study.enqueue_trial(params, skip_if_exists=True)
        self.study.set_user_attr(INITIALIZED, True)

    def _usage(self, views: Iterable[_TrialView]) -> tuple[int, float]:
        samples = seconds = 0
        for view in views:
            samples += view.samples_used()
            seconds += view.seconds()
        return samples, seconds * self.executor.accelerators_per_run

    def _spent(self, usage: tuple[int, float]) -> str:
        """The budget that is used up, named as the user writes it, with its use; '' while none is."""
        samples, device_seconds = usage
        budget = self.spec.budget
        if budget.max_samples is not None and samples >= budget.max_samples:
            return f"budget.maxSamples reached ({samples} of {budget.max_samples} samples evaluated)"
        if budget.max_gpu_seconds is not None and device_seconds >= budget.max_gpu_seconds:
            return (
                f"budget.maxGpuSeconds reached ({device_seconds:.0f} of {budget.max_gpu_seconds:g} "
                "accelerator-seconds used)"
            )
        return ""

    def _exhausted(self, usage: tuple[int, float]) -> bool:
        return bool(self._spent(usage))

    def _launch_new(self, views: list[_TrialView]) -> bool:
        """Ask Optuna for a candidate and start its first run; False when the candidate is skipped."""
        trial = self.study.ask()
        bracket = self.schedule.bracket_of(trial.number, salt=self.name)
        attrs: dict[str, Any] = {BRACKET: bracket}
        if self.pareto:
            attrs[WEIGHTS] = parego_weights(trial.number, len(self.tasks), self.spec.search.seed)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        plan = self.space.suggest(trial)
        if isinstance(plan, Skip):
            trial.set_user_attr(SKIPPED, plan.reason)
            self.study.tell(trial, state=TrialState.PRUNED)
            views.append(
                _TrialView(_Asked(trial.number, TrialState.PRUNED, {**attrs, SKIPPED: plan.reason}), self.schedule)
            )
            return False
        trial.set_user_attr(PLAN, plan.model_dump(mode="json"))
        trial.set_user_attr(READY, True)  # with the parameters, in the same transaction: a complete trial
        name = self.run_name(trial.number, bracket, 0)
        self._start_run(self._trial_spec(name, plan, rung=bracket, bracket=bracket))
        views.append(_TrialView(_Asked(trial.number, TrialState.RUNNING, {**attrs, READY: True}), self.schedule))
        return True

    def _tell(self, view: _TrialView, state: TrialState, values: float | list[float] | None = None) -> None:
        self.study.tell(view.number, values, state=state, skip_if_finished=True)
        view.told = state

    def _trial_id(self, number: int) -> int:
        if number not in self._trial_ids:
            self._trial_ids[number] = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self._trial_ids[number]

    def _store(self, view: _TrialView, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self._trial_id(view.number), key, value)
        view.stored[key] = value

    def _drive(self, view: _TrialView, views: list[_TrialView], *, launching: bool, exhausted: bool) -> int:
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
            self._start_run(self._trial_spec(name, self._plan(view.trial), rung=rung, bracket=view.bracket))
            return 1
        if status.phase is RunPhase.RUNNING:
            return 1
        if status.phase is RunPhase.SUCCEEDED:
            self._record_result(view, rung, status)
            decision = self._decide(view, views, rung, exhausted)
            self._store(view, decision_key(rung), decision)
            self._release_run(name)
            if decision != Decision.PROMOTE:
                self._act(view, rung, decision)
                return 0
            return self._drive(view, views, launching=launching, exhausted=exhausted)  # starts the next rung
        return self._record_failure(view, rung, name, status, launching=launching)

    def _record_result(self, view: _TrialView, rung: int, status: RunStatus) -> None:
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
            self.storage.set_trial_intermediate_value(self._trial_id(view.number), self.schedule.budgets[rung], score)

    def _record_failure(self, view: _TrialView, rung: int, name: str, status: RunStatus, *, launching: bool) -> int:
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
        self._release_run(name)
        if status.failure == "user" or len(failures) > self.spec.budget.max_retries:
            log.warning("trial %d failed at rung %d: %s", view.number, rung, status.reason)
            self._tell(view, TrialState.FAIL)
            return 0
        if not launching:
            return 0
        retry = self.run_name(view.number, rung, len(failures))
        self._start_run(self._trial_spec(retry, self._plan(view.trial), rung=rung, bracket=view.bracket))
        return 1

    def _decide(self, view: _TrialView, views: list[_TrialView], rung: int, exhausted: bool) -> Decision:
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

    def _act(self, view: _TrialView, rung: int, decision: Decision) -> None:
        if decision == Decision.COMPLETE:
            values = self._objective_values(view.counts(rung))
            self._tell(view, TrialState.COMPLETE, values if self.pareto else self._score(view, rung, None))
        else:  # prune, stop, or a promotion past the top (cannot happen) end the trial as pruned
            if decision == Decision.STOP:
                self._store(view, STOPPED, "sample or device-time budget exhausted")
            self._tell(view, TrialState.PRUNED)

    def _stop_running(self, views: list[_TrialView], reason: str) -> None:
        for view in views:
            if view.state != TrialState.RUNNING:
                continue
            if view.attrs.get(READY):
                rung = view.rung
                self._cancel_run(self.run_name(view.number, rung, len(view.failures(rung))))
            self._store(view, STOPPED, reason)
            self._tell(view, TrialState.PRUNED)

    # --- the final stage ------------------------------------------------------------------------------

    def finalists(self) -> dict[str, tuple[int | None, MergePlan]]:
        """Label -> (trial, plan) for the held-out evaluation: the best (or the front) and the baselines."""
        completed = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        chosen: dict[str, tuple[int | None, MergePlan]] = {}
        if completed:
            if self.pareto:
                front = self.study.best_trials
                for index, trial in enumerate(sorted(front, key=lambda t: t.number)):
                    chosen[f"front-{index}"] = (trial.number, self._plan(trial))
            else:
                best = self.study.best_trial
                chosen["best"] = (best.number, self._plan(best))
        for label, plan in baselines(self.facts).items():
            chosen[label] = (None, plan)
        return chosen

    def _final_run_name(self, label: str, trial: int | None) -> str:
        slug = label.replace(":", "-").replace("_", "-")
        return f"{self.name}-final-{slug}" + (f"-t{trial}" if trial is not None else "")

    def _output_uri(self, label: str) -> str | None:
        base = self.spec.output.uri
        if base is None or not (label == "best" or label.startswith("front-")):
            return None
        return base if label == "best" else f"{base.rstrip('/')}/{label}"

    def _finalize(self, launching: bool, spent: str = "") -> SearchStatus:
        finalists = self.finalists()
        if not any(trial is not None for trial, _ in finalists.values()):
            if spent:
                return self._status(Phase.FAILED, f"stopped: {spent} before any trial reached the top rung; raise it")
            return self._status(Phase.FAILED, "no trial reached the top rung; raise budget.maxTrials or the budgets")
        final = dict(self.study.user_attrs.get("final", {}))
        pending = 0
        for label, (trial, plan) in finalists.items():
            name = self._final_run_name(label, trial)
            if final.get(label, {}).get("run") == name:
                continue
            status = self.executor.poll(name)
            if status.phase is RunPhase.MISSING:
                if launching and pending < self.spec.budget.parallel_trials:
                    self.executor.start(self._trial_spec(name, plan, rung=None, output_uri=self._output_uri(label)))
                    self._final_runs_pending.add(name)
                pending += 1
            elif status.phase is RunPhase.RUNNING:
                self._final_runs_pending.add(name)
                pending += 1
            elif status.phase is RunPhase.SUCCEEDED:
                assert status.result is not None
                self.observer.run_finished(rung=None, seconds=status.seconds)
                final[label] = {
                    "run": name,
                    "trial": trial,
                    "tasks": {t: [c.correct, c.evaluated] for t, c in status.result.tasks.items()},
                }
                self.study.set_user_attr("final", final)
                self.executor.release(name)
            else:
                self.observer.run_failed(cause=status.cause or "Error")
                final[label] = {"run": name, "trial": trial, "error": status.reason[:300]}
                self.study.set_user_attr("final", final)
                self.executor.release(name)
        if pending:
            return self._status(Phase.FINALIZING, "evaluating the best merge and the baselines on the held-out split")
        return self._status(Phase.SUCCEEDED, f"done: {spent}" if spent else "done")

    def _progress_message(self, spent: str) -> str:
        if self.spec.suspend:
            return "suspended: no new trial runs start; running ones finish"
        if spent:
            return f"{spent}: finishing running trials"
        return "searching"

    # --- status ---------------------------------------------------------------------------------------

    def status(self) -> SearchStatus:
        """The search's status as stored, without driving anything (for `mergesearch status`)."""
        phase = Phase(self.study.user_attrs.get("phase", Phase.PENDING))
        return self._status(phase, self.study.user_attrs.get("message", ""), persist=False)

    def _status(
        self, phase: Phase, message: str, views: list[_TrialView] | None = None, *, persist: bool = True
    ) -> SearchStatus:
        """The status from `views` (this reconcile's, kept current as it went), or read afresh."""
        if views is None:
            views = [_TrialView(t, self.schedule) for t in self.study.get_trials(deepcopy=False)]
        counts = {"running": 0, "completed": 0, "pruned": 0, "failed": 0, "skipped": 0}
        rungs = [0] * self.schedule.rungs
        running_per_rung = [0] * self.schedule.rungs
        for view in views:
            state = view.state
            if view.attrs.get(SKIPPED):
                counts["skipped"] += 1
            elif state == TrialState.RUNNING:
                counts["running"] += 1
                running_per_rung[view.rung] += 1
            elif state == TrialState.COMPLETE:
                counts["completed"] += 1
            elif state == TrialState.PRUNED:
                counts["pruned"] += 1
            elif state == TrialState.FAIL:
                counts["failed"] += 1
            for rung in range(self.schedule.rungs):
                rungs[rung] += view.result(rung) is not None
        samples, device_seconds = self._usage(views)
        status = SearchStatus(
            phase=phase,
            message=message,
            trials=counts,
            rungs=rungs,
            running_per_rung=running_per_rung,
            samples_used=samples,
            device_seconds=device_seconds,
            budgets=list(self.schedule.budgets),
        )
        completed = [v for v in views if v.state == TrialState.COMPLETE]
        names = [t.name for t in self.tasks]
        if completed:
            points = [self._objective_values(v.counts(self.schedule.top_rung)) for v in completed]
            if self.pareto:
                front = pareto_front(points)
                status.front = [
                    {"trial": completed[i].number, "objectives": dict(zip(names, points[i], strict=True))}
                    for i in sorted(front, key=lambda i: -sum(points[i]))[:FRONT_SIZE_IN_STATUS]
                ]
                status.hypervolume = hypervolume([points[i] for i in front], [0.0] * len(names))
            scores = [weighted_score(dict(zip(names, p, strict=True)), self.objective_weights) for p in points]
            best = max(range(len(completed)), key=lambda i: scores[i])
            status.best = Best(completed[best].number, scores[best], dict(zip(names, points[best], strict=True)))
        attrs = self.study.user_attrs
        for label, record in attrs.get("final", {}).items():
            if "tasks" in record:
                status.final[label] = {t: (c / e if e else 0.0) for t, (c, e) in record["tasks"].items()}
        if persist and (attrs.get("phase"), attrs.get("message")) != (phase, message):
            self.study.set_user_attr("phase", phase)
            self.study.set_user_attr("message", message)
        return status
