"""A small real trial for the runner's tests (see `runs.reverse_trial`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesearch_trial_runner.spec import TrialSpec
from tests.runner.runs import reverse_trial


@pytest.fixture
def trial_spec(world, tmp_path: Path) -> TrialSpec:
    return reverse_trial(world, tmp_path)
