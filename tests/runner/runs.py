"""Running one trial spec to its end through a local executor, for the tests of this folder."""

from __future__ import annotations

import time

from mergesearch_operator.executors.base import RunPhase, RunStatus
from mergesearch_operator.executors.local import LocalExecutor
from mergesearch_trial_runner.spec import TrialSpec


def run_to_the_end(executor: LocalExecutor, spec: TrialSpec, timeout: float = 300) -> RunStatus:
    """Start `spec` and poll it until it is no longer running; its last status."""
    executor.start(spec)
    deadline = time.monotonic() + timeout
    while (status := executor.poll(spec.name)).phase == RunPhase.RUNNING:
        assert time.monotonic() < deadline, "the run never finished"
        time.sleep(0.2)
    return status
