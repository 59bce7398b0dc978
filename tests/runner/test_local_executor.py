"""The local executor shares the machine's cores out among its parallel runs.

Each run's torch would otherwise use every core, and parallel runs would oversubscribe the machine
(on 2 cores the quickstart search took 498 s instead of 30 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergesearch_operator.executors.base import RunPhase
from mergesearch_operator.executors.local import LocalExecutor
from mergesearch_trial_runner.spec import TrialSpec
from tests.runner.runs import run_to_the_end


def spec_as_run(executor: LocalExecutor, spec: TrialSpec) -> TrialSpec:
    """Run `spec`; the spec the run was given, as written into its directory."""
    status = run_to_the_end(executor, spec)
    assert status.phase == RunPhase.SUCCEEDED, status.reason
    return TrialSpec.model_validate_json((executor.runs_dir / spec.name / "spec.json").read_text())


@pytest.mark.slow
def test_parallel_runs_get_a_share_of_the_cores_unless_the_spec_says(trial_spec: TrialSpec, tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    executor = LocalExecutor(tmp_path / "work", timeout_seconds=300, parallel_runs=cores)
    try:
        shared = spec_as_run(executor, trial_spec.model_copy(update={"name": "shared"}))
        explicit = spec_as_run(executor, trial_spec.model_copy(update={"name": "explicit", "cpu_threads": 3}))
    finally:
        executor.close()
    assert shared.cpu_threads == 1
    assert explicit.cpu_threads == 3
    assert LocalExecutor(tmp_path / "other", timeout_seconds=1, parallel_runs=1).cpu_threads == cores
