"""Bad manifests: one test per error class, each message naming the field and the fix."""

from __future__ import annotations

import copy

import pytest

from mergesearch_operator.spec import ManifestError, load_manifest, parse_manifest

from .conftest import BASE_MANIFEST


def error(**changes) -> ManifestError:
    document = copy.deepcopy(BASE_MANIFEST)
    for path, value in changes.items():
        target = document
        keys = path.split("__")
        for key in keys[:-1]:
            target = target[key]
        if value is None:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    with pytest.raises(ManifestError) as info:
        parse_manifest(document)
    return info.value


def test_the_example_is_valid():
    resource = parse_manifest(copy.deepcopy(BASE_MANIFEST))
    assert resource.spec.fidelity.reduction_factor == 3
    assert resource.spec.expert_names == ["reverse", "sort", "shift"]


def test_fidelity_min_above_max():
    e = error(spec__fidelity={"minSamples": 500, "maxSamples": 100})
    assert e.field == "spec.fidelity"
    assert "minSamples (500) is above maxSamples (100); lower minSamples or raise maxSamples" in str(e)


def test_reduction_factor_below_two():
    e = error(spec__fidelity={"reductionFactor": 1})
    assert e.field == "spec.fidelity.reductionFactor" and "greater than or equal to 2" in str(e)


def test_no_brackets():
    e = error(spec__fidelity={"brackets": 0})
    assert e.field == "spec.fidelity.brackets" and "greater than or equal to 1" in str(e)


def test_unknown_method():
    e = error(spec__searchSpace={"type": "LFS", "methods": ["linear", "frankenmerge"]})
    assert e.field == "spec.searchSpace.methods.1" and "'task_arithmetic'" in str(e)


def test_unknown_search_space_type():
    e = error(spec__searchSpace={"type": "XYZ"})
    assert e.field == "spec.searchSpace" and "'LFS', 'DIS'" in str(e)


def test_objective_without_data():
    e = error(spec__objectives=[{"name": "sort"}])
    assert e.field == "spec.objectives.0.data" and "Field required" in str(e)


def test_parallel_trials_below_one():
    e = error(spec__budget={"parallelTrials": 0})
    assert e.field == "spec.budget.parallelTrials"


def test_zero_budget():
    e = error(spec__budget={"maxTrials": 0})
    assert e.field == "spec.budget.maxTrials" and "greater than or equal to 1" in str(e)


def test_pareto_with_one_objective():
    e = error(spec__objectives=[{"name": "sort", "data": "x.jsonl"}], spec__search={"objectiveMode": "pareto"})
    assert "pareto needs two or more objectives" in str(e)


def test_duplicate_expert_names():
    e = error(spec__models={"base": "b", "experts": [{"name": "a", "uri": "x"}, {"name": "a", "uri": "y"}]})
    assert e.field == "spec.models" and "['a'] appear twice" in str(e)


def test_misspelt_field_is_not_ignored():
    e = error(spec__budget={"maxTrails": 10})
    assert e.field == "spec.budget.maxTrails" and "Extra inputs are not permitted" in str(e)


def test_bad_answer_pattern():
    e = error(spec__objectives=[{"name": "sort", "data": "x.jsonl", "answerPattern": "The answer is: .*"}])
    assert "needs one capturing group" in str(e)


def test_dis_scale_range_must_contain_one():
    e = error(spec__searchSpace={"type": "DIS", "scaleRange": [1.1, 1.5]})
    assert "0 < low <= 1 <= high" in str(e)


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("spec: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(path)
