"""A synthetic executor (a fake, named as such): it runs no model, it scores plans by a formula.

Each plan has a true accuracy per task (a smooth function of its parameters, so a search can improve on
it); a run "evaluates" a sample range by drawing, per sample index, a seeded coin with that accuracy.
Counts of consecutive ranges therefore add up exactly, and every evaluated (trial, task, sample) is
logged so tests can check that no sample is evaluated twice. Runs finish after a few polls, in an order
set by a seeded delay, so promotions arrive asynchronously.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from mergesearch_operator.executors.base import Executor, RunPhase, RunStatus
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import Counts, TrialResult, TrialSpec


def true_accuracy(plan: MergePlan, task: str) -> float:
    """Higher when the plan leans on the expert named like the task, lower with more layers stacked."""
    weight_on_task, total = 0.0, 0.0
    for layer_slice in plan.slices:
        for source in layer_slice.sources:
            weight = source.params.get("weight")
            value = float(weight[-1].value) if weight else 1.0
            total += value
            if source.model == task:
                weight_on_task += value
    share = weight_on_task / total if total else 0.0
    return max(0.02, min(0.98, 0.2 + 0.6 * share))


def _coin(plan_key: str, task: str, index: int) -> float:
    digest = hashlib.blake2b(f"{plan_key}:{task}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass
class SyntheticExecutor(Executor):
    seed: int = 0
    fail: set[str] = field(default_factory=set)  # run names that fail (infrastructure)
    fail_user: set[str] = field(default_factory=set)
    runs: dict[str, dict] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    evaluated: list[tuple[str, str, int]] = field(default_factory=list)  # (trial's run prefix, task, sample)
    released: set[str] = field(default_factory=set)
    accelerators_per_run: float = 1.0

    def start(self, spec: TrialSpec) -> None:
        if spec.name in self.runs:
            return
        self.started.append(spec.name)
        delay = random.Random(f"{self.seed}:{spec.name}").randint(1, 4)
        self.runs[spec.name] = {"spec": spec, "polls_left": delay, "cancelled": False}

    def poll(self, name: str) -> RunStatus:
        run = self.runs.get(name)
        if run is None:
            return RunStatus(RunPhase.MISSING)
        if run["cancelled"]:
            return RunStatus(RunPhase.FAILED, failure="infrastructure", cause="Lost", reason="cancelled")
        if run["polls_left"] > 0:
            run["polls_left"] -= 1
            return RunStatus(RunPhase.RUNNING)
        spec: TrialSpec = run["spec"]
        if name in self.fail:
            return RunStatus(
                RunPhase.FAILED, failure="infrastructure", cause="OOMKilled", reason="OOMKilled", seconds=1.0
            )
        if name in self.fail_user:
            return RunStatus(RunPhase.FAILED, failure="user", cause="UserError", reason="bad task file", seconds=1.0)
        if "result" not in run:
            plan_key = hashlib.blake2b(
                json.dumps(spec.plan.model_dump(mode="json"), sort_keys=True).encode()
            ).hexdigest()
            tasks = {}
            for task in spec.tasks:
                start, end = spec.ranges.get(task.name, (0, 200))
                accuracy = true_accuracy(spec.plan, task.name)
                indices = range(start, end)
                if spec.split == "search":
                    trial = spec.name.rsplit("-r", 1)[0]
                    self.evaluated.extend((trial, task.name, i) for i in indices)
                correct = sum(_coin(plan_key + spec.split, task.name, i) < accuracy for i in indices)
                tasks[task.name] = Counts(correct=correct, evaluated=len(indices))
            run["result"] = TrialResult(name=name, ok=True, tasks=tasks, ranges=dict(spec.ranges))
        return RunStatus(RunPhase.SUCCEEDED, result=run["result"], seconds=10.0)

    def cancel(self, name: str) -> None:
        if name in self.runs:
            self.runs[name]["cancelled"] = True

    def held(self) -> list[str]:
        return [name for name in self.runs if name not in self.released]

    def release(self, name: str) -> None:
        self.released.add(name)
