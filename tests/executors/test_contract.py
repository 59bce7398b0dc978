"""The executor contract (`mergesearch_operator.executors.base`), held by every executor: local processes,
a pod per run, and runs in worker pods. Each test runs against each executor in its harness.

What is particular to one executor (the pod states a pod executor reads, a worker pod's timing rules,
the local executor's share of cores) is tested beside it: tests/cluster and tests/runner.
"""

from __future__ import annotations

import time

from mergesearch_operator.executors.base import CAUSES, RunPhase, RunStatus
from tests.executors.harnesses import Harness

RUN_TIMEOUT = 300.0


def wait(harness: Harness, name: str) -> RunStatus:
    """Poll until the run is no longer RUNNING, letting time pass in between; its last status."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while (status := harness.executor.poll(name)).phase is RunPhase.RUNNING:
        assert time.monotonic() < deadline, f"{name} never finished"
        harness.step()
    return status


def test_an_unknown_run_is_missing_and_cancel_and_release_of_it_do_nothing(harness: Harness) -> None:
    assert harness.executor.poll("s-t9-r0").phase is RunPhase.MISSING
    harness.executor.cancel("s-t9-r0")
    harness.executor.release("s-t9-r0")
    harness.step()
    assert harness.executor.poll("s-t9-r0").phase is RunPhase.MISSING
    assert "s-t9-r0" not in harness.executor.held()


def test_a_run_goes_from_running_to_succeeded_with_its_result_and_start_is_idempotent(harness: Harness) -> None:
    spec = harness.spec("s-t0-r0")
    harness.executor.start(spec)
    harness.executor.start(spec)
    assert harness.executor.poll(spec.name).phase is RunPhase.RUNNING
    assert spec.name in harness.executor.held()
    status = wait(harness, spec.name)
    assert status.phase is RunPhase.SUCCEEDED, status.reason
    assert status.result is not None and status.result.ok and status.result.name == spec.name
    assert set(status.result.tasks) == {task.name for task in spec.tasks}
    assert (status.failure, status.cause) == (None, "")
    harness.executor.start(spec)  # finished, not released: still the same run
    harness.step()
    assert harness.executor.poll(spec.name).phase is RunPhase.SUCCEEDED
    assert harness.starts(spec.name) == 1


def test_release_lets_a_finished_run_go_and_is_idempotent(harness: Harness) -> None:
    spec = harness.spec("s-t0-r0")
    harness.executor.start(spec)
    assert wait(harness, spec.name).phase is RunPhase.SUCCEEDED
    harness.executor.release(spec.name)
    harness.executor.release(spec.name)
    harness.step()
    assert harness.executor.poll(spec.name).phase is RunPhase.MISSING
    assert spec.name not in harness.executor.held()


def test_a_released_failed_run_is_no_longer_held(harness: Harness) -> None:
    """`held()` names runs "running, or finished and not yet released": a failed run kept for debugging
    after its release is not one, or every sweep would release it again."""
    spec = harness.spec("s-t0-r0", outcome="user")
    harness.executor.start(spec)
    assert wait(harness, spec.name).phase is RunPhase.FAILED
    harness.executor.release(spec.name)
    harness.step()
    assert spec.name not in harness.executor.held()


def test_cancel_stops_a_run_and_is_idempotent(harness: Harness) -> None:
    spec = harness.spec("s-t0-r0")
    harness.executor.start(spec)
    harness.hold(spec.name)
    harness.executor.cancel(spec.name)
    harness.executor.cancel(spec.name)
    assert wait(harness, spec.name).phase in (RunPhase.MISSING, RunPhase.FAILED)
    harness.executor.release(spec.name)
    harness.executor.release(spec.name)
    assert harness.starts(spec.name) == 1


def test_a_new_executor_reattaches_to_a_running_run_and_sees_it_finish(harness: Harness) -> None:
    spec = harness.spec("s-t0-r0")
    harness.executor.start(spec)
    harness.hold(spec.name)
    assert harness.executor.poll(spec.name).phase is RunPhase.RUNNING
    restarted = harness.restart()
    assert restarted.poll(spec.name).phase is RunPhase.RUNNING
    restarted.start(spec)  # the controller starts what it does not know to be running: no second copy
    harness.step()
    assert spec.name in restarted.held()
    harness.resume(spec.name)
    status = wait(harness, spec.name)
    assert status.phase is RunPhase.SUCCEEDED, status.reason
    assert status.result is not None and status.result.name == spec.name
    assert harness.starts(spec.name) == 1


def test_a_user_error_is_a_user_failure_with_its_cause(harness: Harness) -> None:
    spec = harness.spec("s-t0-r0", outcome="user")
    harness.executor.start(spec)
    status = wait(harness, spec.name)
    assert (status.phase, status.failure) == (RunPhase.FAILED, "user"), status
    assert status.reason
    assert status.cause in CAUSES


def test_an_infrastructure_failure_is_an_infrastructure_failure_with_its_cause(harness: Harness) -> None:
    spec = harness.spec("s-t0-r0")
    harness.executor.start(spec)
    harness.hold(spec.name)
    harness.break_down(spec.name)
    status = wait(harness, spec.name)
    assert (status.phase, status.failure) == (RunPhase.FAILED, "infrastructure"), status
    assert status.cause in CAUSES and status.reason
