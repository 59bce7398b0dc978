"""A small real trial (the reverse expert's task vector on the tiny base, 12 samples of its task) and
running a trial spec to its end through a local executor, for the tests of the executors."""

from __future__ import annotations

import time
from pathlib import Path

from mergesearch_operator.executors.base import RunPhase, RunStatus
from mergesearch_operator.executors.local import LocalExecutor
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import TrialSpec
from mergesearch_trial_runner.testbed.models import World


def reverse_trial(world: World, scratch: Path, name: str = "fresh") -> TrialSpec:
    """The reverse expert's task vector on layers 0-3 of the tiny base, scored on 12 samples of its task."""
    layers = [0, 4]
    plan = MergePlan.model_validate(
        {
            "models": {"base": str(world.model("base")), "reverse": str(world.model("reverse"))},
            "base_model": "base",
            "slices": [
                {
                    "method": "task_arithmetic",
                    "base": {"model": "base", "layers": layers},
                    "sources": [{"model": "reverse", "layers": layers, "params": {"weight": 1.0}}],
                }
            ],
        }
    )
    return TrialSpec(
        name=name,
        plan=plan,
        tasks=[{"name": "reverse", "data": str(world.split("reverse", "search")), "max_new_tokens": 8}],
        ranges={"reverse": (0, 12)},
        backend="hf",
        engine_args={"device": "cpu"},
        cache_dir=str(scratch / "cache"),
        scratch_dir=str(scratch / "scratch"),
        result_file=str(scratch / "result.json"),
    )


def run_to_the_end(executor: LocalExecutor, spec: TrialSpec, timeout: float = 300) -> RunStatus:
    """Start `spec` and poll it until it is no longer running; its last status."""
    executor.start(spec)
    deadline = time.monotonic() + timeout
    while (status := executor.poll(spec.name)).phase == RunPhase.RUNNING:
        assert time.monotonic() < deadline, "the run never finished"
        time.sleep(0.2)
    return status
