"""Level-triggered cleanup: a run the study no longer wants is let go at the next reconcile, whatever was
lost on the way, as the operator's restart after a crash in the window between a commit and its delete.

The crash is an executor whose release raises `SystemExit` once: the decision (or the held-out result) is
committed, the process "dies" before the release reaches the executor, and a new controller (nothing in
memory) over the same study and the same runs must let the run go.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mergesearch_operator.search.controller import decision_key
from tests.search.searches import make_controller, manifest, run_to_end
from tests.search.synthetic import SyntheticExecutor


@dataclass
class DiesAtRelease(SyntheticExecutor):
    """Dies (SystemExit, which nothing catches) at the first release of a run whose name has `marker`."""

    marker: str = "-r"
    died_at: str = ""

    def release(self, name: str) -> None:
        if not self.died_at and self.marker in name:
            self.died_at = name
            raise SystemExit(f"killed before releasing {name}")
        super().release(name)


def test_a_run_whose_release_died_with_the_operator_is_let_go_after_the_restart(storage):
    executor = DiesAtRelease()
    document = manifest(budget={"maxTrials": 8, "parallelTrials": 2})
    controller = make_controller(document, storage, executor)
    with pytest.raises(SystemExit):
        for _ in range(200):
            controller.reconcile()
    name = executor.died_at
    trial = int(name.split("-t")[1].split("-r")[0])
    rung = int(name.split("-r")[1].split("-")[0])
    stored = controller.study.get_trials()[trial].user_attrs
    assert decision_key(rung) in stored  # the decision was committed before the process died
    assert name in executor.held()  # and its run was never let go

    restarted = make_controller(document, storage, executor)  # a new process: nothing in memory
    restarted.reconcile()
    assert name not in executor.held()
    assert run_to_end(restarted).phase == "Succeeded"
    assert executor.held() == []  # nothing left behind at the end


def test_a_final_stage_run_whose_release_died_is_let_go_after_the_restart(storage):
    executor = DiesAtRelease(marker="-final-")
    document = manifest(budget={"maxTrials": 6, "parallelTrials": 2})
    controller = make_controller(document, storage, executor)
    with pytest.raises(SystemExit):
        run_to_end(controller)
    name = executor.died_at
    assert any(record.get("run") == name for record in controller.study.user_attrs["final"].values())
    assert name in executor.held()

    restarted = make_controller(document, storage, executor)
    assert run_to_end(restarted).phase == "Succeeded"
    assert executor.held() == []


def test_runs_the_study_does_not_know_are_let_go_and_live_ones_kept(storage):
    """A run left by an earlier search of the same name, or a retry's superseded first attempt."""
    executor = SyntheticExecutor()
    document = manifest(budget={"maxTrials": 4, "parallelTrials": 2})
    controller = make_controller(document, storage, executor)
    controller.reconcile()
    live = set(executor.held())
    assert live  # the first runs are started and held
    executor.runs["synthetic-t99-r0"] = {"spec": None, "polls_left": 0, "cancelled": False, "result": None}
    executor.runs["synthetic-t98-r1"] = {"spec": None, "polls_left": 5, "cancelled": False}  # still running
    controller.reconcile()
    assert "synthetic-t99-r0" in executor.released
    assert executor.runs["synthetic-t98-r1"]["cancelled"]  # a running stray is cancelled, not just dropped
    assert live <= set(executor.held()) | executor.released  # live runs are not swept (finished ones released)
