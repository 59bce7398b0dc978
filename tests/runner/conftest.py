"""A small real trial: the reverse expert's task vector on the tiny base, 12 samples of its task."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import TrialSpec


@pytest.fixture
def trial_spec(world, tmp_path: Path) -> TrialSpec:
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
        name="fresh",
        plan=plan,
        tasks=[{"name": "reverse", "data": str(world.split("reverse", "search")), "max_new_tokens": 8}],
        ranges={"reverse": (0, 12)},
        backend="hf",
        engine_args={"device": "cpu"},
        cache_dir=str(tmp_path / "cache"),
        scratch_dir=str(tmp_path / "scratch"),
        result_file=str(tmp_path / "result.json"),
    )
