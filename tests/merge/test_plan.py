"""Plan validation: every bad plan is refused with a message that names the field at fault."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mergesearch_trial_runner.checkpoint import Checkpoint
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.plan.tensors import PlanError, plan_tensors


def plan(slices, **extra):
    return {"models": {"base": "/m/base", "a": "/m/a", "b": "/m/b"}, "base_model": "base", "slices": slices, **extra}


def ties_slice(**overrides):
    layer_slice = {
        "method": "ties",
        "base": {"model": "base", "layers": [0, 4]},
        "sources": [{"model": "a", "layers": [0, 4], "params": {"weight": 1.0}}],
        "params": {"density": 0.5},
    }
    layer_slice.update(overrides)
    return layer_slice


def error_of(document) -> str:
    with pytest.raises(ValidationError) as info:
        MergePlan.model_validate(document)
    first = info.value.errors()[0]
    return ".".join(str(p) for p in first["loc"]) + ": " + first["msg"]


def test_a_valid_plan_round_trips_through_json():
    parsed = MergePlan.model_validate(plan([ties_slice()]))
    assert MergePlan.from_json(parsed.to_json()) == parsed


def test_unknown_method_lists_the_known_ones():
    message = error_of(plan([ties_slice(method="frankenstein")]))
    assert message.startswith("slices.0")
    assert "unknown merge method 'frankenstein'" in message and "task_arithmetic" in message


def test_method_that_needs_a_base_without_one():
    message = error_of(plan([ties_slice(base=None)]))
    assert message.startswith("slices.0") and "needs a base" in message


def test_unknown_parameter_for_the_method():
    message = error_of(plan([ties_slice(params={"t": 0.5})]))
    assert "has no parameter 't'" in message


def test_density_out_of_range():
    message = error_of(plan([ties_slice(params={"density": 1.5})]))
    assert "`density` is 1.5, but must be <= 1.0" in message


def test_shared_parameter_given_per_source():
    bad = ties_slice(sources=[{"model": "a", "layers": [0, 4], "params": {"lambda": 1.0}}])
    assert "sources[0].params.lambda: not a per-source parameter" in error_of(plan([bad]))


def test_slerp_takes_one_source_besides_the_base():
    bad = {
        "method": "slerp",
        "base": {"model": "base", "layers": [0, 4]},
        "params": {"t": 0.5},
        "sources": [{"model": "a", "layers": [0, 4]}, {"model": "b", "layers": [0, 4]}],
    }
    assert "takes at most 1 source(s)" in error_of(plan([bad]))


def test_sources_of_unequal_length():
    bad = ties_slice(sources=[{"model": "a", "layers": [0, 3], "params": {"weight": 1.0}}])
    assert "same number of layers" in error_of(plan([bad]))


def test_unknown_model_name():
    bad = ties_slice(sources=[{"model": "c", "layers": [0, 4], "params": {"weight": 1.0}}])
    assert "uses model 'c', which is not one of models" in error_of(plan([bad]))


def test_empty_layer_range():
    bad = ties_slice(sources=[{"model": "a", "layers": [2, 2]}])
    assert "layers must be [start, end)" in error_of(plan([bad]))


@pytest.fixture
def checkpoints(models):
    return {
        "base": Checkpoint.open(models["base"]),
        "a": Checkpoint.open(models["a"]),
        "b": Checkpoint.open(models["b"]),
    }


def test_layer_range_past_the_model(checkpoints):
    bad = MergePlan.model_validate(
        plan(
            [
                ties_slice(
                    base={"model": "base", "layers": [2, 6]},
                    sources=[{"model": "a", "layers": [2, 6], "params": {"weight": 1.0}}],
                )
            ]
        )
    )
    with pytest.raises(PlanError) as info:
        plan_tensors(bad, checkpoints)
    assert info.value.field == "slices[0].sources[0].layers"
    assert "model 'a' has 4 layers" in str(info.value)


def test_required_parameter_that_no_entry_provides(checkpoints):
    bad = MergePlan.model_validate(
        plan(
            [
                ties_slice(
                    sources=[{"model": "a", "layers": [0, 4], "params": {"weight": [{"filter": "mlp", "value": 1.0}]}}]
                )
            ]
        )
    )
    with pytest.raises(PlanError) as info:
        plan_tensors(bad, checkpoints)
    assert info.value.field == "slices[0].sources[0].params.weight"
    assert "self_attn" in str(info.value) or "embed" in str(info.value)


def test_linear_weights_that_sum_to_zero(checkpoints):
    bad = MergePlan.model_validate(
        plan(
            [
                {
                    "method": "linear",
                    "sources": [
                        {"model": "a", "layers": [0, 4], "params": {"weight": 1.0}},
                        {"model": "b", "layers": [0, 4], "params": {"weight": -1.0}},
                    ],
                }
            ]
        )
    )
    with pytest.raises(PlanError, match="sum to 0"):
        plan_tensors(bad, checkpoints)


def test_filters_pick_the_first_matching_entry(checkpoints):
    good = MergePlan.model_validate(
        plan(
            [
                ties_slice(
                    params={
                        "density": [
                            {"filter": "self_attn", "value": 0.1},
                            {"filter": "mlp", "value": 0.2},
                            {"value": 0.3},
                        ]
                    }
                )
            ]
        )
    )
    ops = {op.output: op for op in plan_tensors(good, checkpoints).ops}
    assert ops["model.layers.1.self_attn.q_proj.weight"].per_source[0]["density"] == 0.1
    assert ops["model.layers.1.mlp.up_proj.weight"].per_source[0]["density"] == 0.2
    assert ops["model.layers.1.input_layernorm.weight"].per_source[0]["density"] == 0.3
    assert ops["model.embed_tokens.weight"].per_source[0]["density"] == 0.3
