"""`mergesearch-trial run` as a trial pod runs it: a fresh process, its report, and a quiet exit.

The process imports its backend and freezes that heap out of the garbage collector's reach before the
trial (`cli.warmed_up`), and leaves without finalizing the interpreter once it has reported. An exit
that finalized it with the heap still frozen made Triton's bindings report hundreds of "leaked" types
on stderr at every trial's end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mergesearch_trial_runner.spec import EXIT_OK, TrialResult, TrialSpec


@pytest.mark.slow
def test_a_fresh_trial_process_reports_its_counts_and_exits_quietly(trial_spec: TrialSpec, tmp_path: Path) -> None:
    spec = trial_spec.model_copy(update={"cpu_threads": 1})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())

    run = subprocess.run(
        [sys.executable, "-m", "mergesearch_trial_runner.cli", "run", str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert run.returncode == EXIT_OK, run.stderr[-3000:]
    result = TrialResult.model_validate_json((tmp_path / "result.json").read_text())
    assert result.ok and result.tasks["reverse"].evaluated == 12
    assert result.tasks["reverse"].correct > 6  # the reverse expert alone, on its own task
    assert "leaked" not in run.stderr, run.stderr[-3000:]
