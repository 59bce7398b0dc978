"""The final stage: the best merge (or every member of the Pareto front), each expert alone and every
hand recipe, evaluated on the held-out split, and the best merge written to `output.uri`.

Like every other action it stores, then acts: a run's held-out result is committed (the study's `final`
attribute, by label) before the run is released, and a release lost with a crashed controller is found
by the sweep. A label whose record names the run of its current finalist is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesearch_trial_runner.plan.ir import MergePlan

from ...executors.base import RunPhase
from ...spaces.baselines import baselines
from ..phases import Phase

if TYPE_CHECKING:
    from .loop import SearchController

FINAL = "final"  # study attribute: label -> {"run", "trial", "tasks": {task: [correct, evaluated]}} or "error"


class FinalStage:
    def __init__(self, controller: SearchController):
        self.controller = controller

    def finalists(self) -> dict[str, tuple[int | None, MergePlan]]:
        """Label -> (trial, plan) for the held-out evaluation: the best (or the front) and the baselines."""
        c = self.controller
        chosen: dict[str, tuple[int | None, MergePlan]] = {}
        best = sorted(c.records.best_trials(c.pareto), key=lambda t: t.number)
        for index, trial in enumerate(best):
            chosen[f"front-{index}" if c.pareto else "best"] = (trial.number, c.plan(trial))
        for label, plan in baselines(c.facts).items():
            chosen[label] = (None, plan)
        return chosen

    def run_name(self, label: str, trial: int | None) -> str:
        slug = label.replace(":", "-").replace("_", "-")
        return f"{self.controller.name}-final-{slug}" + (f"-t{trial}" if trial is not None else "")

    def _output_uri(self, label: str) -> str | None:
        base = self.controller.spec.output.uri
        if base is None or not (label == "best" or label.startswith("front-")):
            return None
        return base if label == "best" else f"{base.rstrip('/')}/{label}"

    def advance(self, *, launching: bool, spent: str) -> tuple[Phase, str, set[str]]:
        """Start, poll and record the final runs: the phase and message after that, and the names of the
        runs still live."""
        c = self.controller
        finalists = self.finalists()
        if not any(trial is not None for trial, _ in finalists.values()):
            if spent:
                return Phase.FAILED, f"stopped: {spent} before any trial reached the top rung; raise it", set()
            return Phase.FAILED, "no trial reached the top rung; raise budget.maxTrials or the budgets", set()
        final = dict(c.records.attrs.get(FINAL, {}))
        live: set[str] = set()
        pending = 0
        with c.acts.transaction():
            for label, (trial, plan) in finalists.items():
                name = self.run_name(label, trial)
                if final.get(label, {}).get("run") == name:
                    continue
                status = c.executor.poll(name)
                if status.phase is RunPhase.MISSING:
                    if launching and pending < c.spec.budget.parallel_trials:
                        c.acts.start(c.trial_spec(name, plan, rung=None, output_uri=self._output_uri(label)))
                        live.add(name)
                    pending += 1
                    continue
                if status.phase is RunPhase.RUNNING:
                    live.add(name)
                    pending += 1
                    continue
                if status.phase is RunPhase.SUCCEEDED:
                    assert status.result is not None
                    c.observer.run_finished(rung=None, seconds=status.seconds)
                    tasks = {t: [n.correct, n.evaluated] for t, n in status.result.tasks.items()}
                    final[label] = {"run": name, "trial": trial, "tasks": tasks}
                else:
                    c.observer.run_failed(cause=status.cause or "Error")
                    final[label] = {"run": name, "trial": trial, "error": status.reason[:300]}
                c.records.set_attr(FINAL, final)
                c.acts.release(name)
        if pending:
            return Phase.FINALIZING, "evaluating the best merge and the baselines on the held-out split", live
        return Phase.SUCCEEDED, f"done: {spent}" if spent else "done", live
