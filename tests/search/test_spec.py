"""Bad manifests: one test per error class, each message naming the field and the fix."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from mergesearch_operator.preflight import check_objectives, model_facts
from mergesearch_operator.spec import ManifestError, load_manifest, parse_manifest
from mergesearch_trial_runner.store import ModelStore
from tests.search.searches import BASE_MANIFEST


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


def test_a_study_accepted_before_asha_was_the_default_keeps_every_bracket():
    from mergesearch_operator.search.study import defining, effective_spec

    spec = parse_manifest(copy.deepcopy(BASE_MANIFEST)).spec
    assert spec.fidelity.brackets == 1  # ASHA unless the manifest says otherwise
    accepted = defining(spec)
    accepted["fidelity"]["brackets"] = None  # what such a study stored: the default was null, every bracket
    effective, refused = effective_spec(spec, accepted)
    assert refused == ["fidelity"] and effective.fidelity.brackets is None


def test_unknown_method():
    e = error(spec__searchSpace={"type": "LFS", "methods": ["linear", "frankenmerge"]})
    assert e.field == "spec.searchSpace.methods[1]" and "'task_arithmetic'" in str(e)


def test_unknown_search_space_type():
    e = error(spec__searchSpace={"type": "XYZ"})
    assert e.field == "spec.searchSpace" and "'LFS', 'DIS'" in str(e)


def test_objective_without_data():
    e = error(spec__objectives=[{"name": "sort"}])
    assert e.field == "spec.objectives[0].data" and "Field required" in str(e)


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
    assert e.field == "spec.budget.maxTrails" and "unknown field; did you mean `maxTrials`?" in str(e)


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


def test_a_misspelt_key_reports_every_error_unknown_fields_first_with_the_closest_name():
    document = copy.deepcopy(BASE_MANIFEST)
    document["spec"]["objectivs"] = document["spec"].pop("objectives")
    document["spec"]["searchSpace"]["methds"] = document["spec"]["searchSpace"].pop("methods")
    document["spec"]["budget"]["maxTrials"] = 0
    with pytest.raises(ManifestError) as info:
        parse_manifest(document)
    assert str(info.value).splitlines() == [
        "spec.searchSpace.methds: unknown field; did you mean `methods`?",
        "spec.objectivs: unknown field; did you mean `objectives`?",
        "spec.objectives: Field required",
        "spec.budget.maxTrials: Input should be greater than or equal to 1",
    ]
    assert info.value.field == "spec.searchSpace.methds"


def test_an_unknown_field_with_no_close_name_lists_the_fields_there():
    e = error(spec__models__experts=[{"name": "a", "uri": "x", "revision": "main"}])
    assert e.field == "spec.models.experts[0].revision" and "unknown field; the fields here are name, uri" in str(e)


def test_unknown_top_level_keys_are_refused_but_a_status_is_not():
    e = error(specs={"fidelity": {}})
    assert e.field == "specs" and "did you mean `spec`?" in str(e)
    document = copy.deepcopy(BASE_MANIFEST)
    document["status"] = {"phase": "Running"}  # what `kubectl get -o yaml` gives back
    assert parse_manifest(document).metadata.name == "synthetic"


def test_engine_args_the_backend_does_not_take_are_refused():
    e = error(spec__trial={"backend": "vllm", "engineArgs": {"device": "cpu"}})
    assert e.field == "spec.trial.engineArgs"
    assert "`device` is not a setting of backend vllm; its settings are " in str(e)
    assert "max_model_len" in str(e) and "kv_cache_gib" in str(e)
    e = error(spec__trial={"backend": "hf", "engineArgs": {"batchsize": 8}})
    assert "`batchsize` is not a setting of backend hf (did you mean `batch_size`?)" in str(e)
    e = error(spec__trial={"backend": "hf", "engineArgs": {"batch_size": 0}})
    assert e.field == "spec.trial.engineArgs" and "`batch_size`: Input should be greater than or equal to 1" in str(e)
    document = copy.deepcopy(BASE_MANIFEST)
    document["spec"]["trial"] = {"backend": "hf", "engineArgs": {"device": "cpu"}}
    assert parse_manifest(document).spec.trial.engine_args == {"device": "cpu"}


@pytest.mark.parametrize(
    ("backend", "engine_args"),
    [
        ("hf", {"trust_remote_code": True}),
        ("vllm", {"trust_remote_code": True}),
        ("vllm", {"engine_args": {"trust_remote_code": True}}),  # vLLM's passthrough to vllm.LLM
    ],
)
def test_engine_args_cannot_trust_remote_code(backend, engine_args):
    e = error(spec__trial={"backend": backend, "engineArgs": engine_args})
    assert e.field == "spec.trial.engineArgs" and "trust_remote_code cannot be set" in str(e)


def test_a_search_that_names_no_trial_image_leaves_it_to_the_operator():
    assert parse_manifest(copy.deepcopy(BASE_MANIFEST)).spec.trial.image is None


# -- preflight: what the models and task files say --------------------------------------------------------


def _world_spec(world, **spec_changes):
    document = copy.deepcopy(BASE_MANIFEST)
    document["spec"]["models"] = {
        "base": str(world.model("base")),
        "experts": [{"name": e, "uri": str(world.model(e))} for e in ("reverse", "sort")],
    }
    document["spec"]["objectives"] = [
        {"name": t, "data": str(world.split(t, "search")), "testData": str(world.split(t, "test"))}
        for t in ("reverse", "sort")
    ]
    document["spec"].update(spec_changes)
    return parse_manifest(document).spec


def _model_with_config(source: Path, target: Path, **changes) -> Path:
    """A copy of a model directory (its weights linked) whose config.json has `changes`."""
    target.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (target / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize(
    "changes",
    [
        {"auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}},
        {"model_type": "mergesearch-custom-arch"},
    ],
    ids=["auto_map", "unknown-model-type"],
)
@pytest.mark.parametrize("which", ["base", "expert"])
def test_preflight_refuses_a_model_that_needs_remote_code(world, tmp_path, changes, which):
    spec = _world_spec(world)
    name = "base" if which == "base" else "sort"
    custom = _model_with_config(world.model(name), tmp_path / "custom", **changes)
    if which == "base":
        spec.models.base = str(custom)
        field = "spec.models.base"
    else:
        spec.models.experts[1].uri = str(custom)
        field = "spec.models.experts[1].uri"
    with pytest.raises(ManifestError) as info:
        model_facts(spec, ModelStore(tmp_path / "cache"))
    key = next(iter(changes))
    assert info.value.field == field
    assert f"config.json has the key `{key}`" in str(info.value) or f"config.json's key `{key}`" in str(info.value)
    assert "trust_remote_code" in str(info.value)


def test_preflight_accepts_the_world(world, tmp_path):
    assert model_facts(_world_spec(world), ModelStore(tmp_path / "cache")).experts == ("reverse", "sort")


def test_a_missing_test_file_is_named_as_test_data(world, tmp_path):
    spec = _world_spec(world)
    spec.objectives[1].test_data = str(tmp_path / "missing.jsonl")
    with pytest.raises(ManifestError) as info:
        check_objectives(spec, ModelStore(tmp_path / "cache"))
    assert info.value.field == "spec.objectives[1].testData" and "missing.jsonl" in str(info.value)
    spec.objectives[1].test_data = None
    spec.objectives[1].data = str(tmp_path / "missing.jsonl")
    with pytest.raises(ManifestError) as info:
        check_objectives(spec, ModelStore(tmp_path / "cache"))
    assert info.value.field == "spec.objectives[1].data"


def test_an_lm_eval_objective_s_missing_files_and_unknown_task_are_named(world, tmp_path):
    documents = tmp_path / "gsm8k.jsonl"
    documents.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(120)))
    base = {"name": "gsm8k", "kind": "lm_eval", "lmEvalTask": "gsm8k", "data": str(documents)}
    cases = [
        ({"fewShotData": str(tmp_path / "missing.jsonl")}, "spec.objectives[1].fewShotData", "missing.jsonl"),
        ({"fewShotData": str(documents), "lmEvalTask": "gsm8k_typo"}, "spec.objectives[1].lmEvalTask", "gsm8k_typo"),
        ({}, "spec.objectives[1].lmEvalTask", "give their documents as few_shot_data"),  # gsm8k is 5-shot
        ({"taskConfig": str(tmp_path / "none.yaml")}, "spec.objectives[1].taskConfig", "none.yaml"),
    ]
    for changes, field, message in cases:
        spec = _world_spec(world)
        objective = {**base, **changes}
        spec.objectives[1] = type(spec.objectives[0]).model_validate(objective)
        with pytest.raises(ManifestError) as info:
            check_objectives(spec, ModelStore(tmp_path / "cache"))
        assert info.value.field == field and message in str(info.value), (changes, info.value)
    spec.objectives[1] = type(spec.objectives[0]).model_validate({**base, "fewShotData": str(documents)})
    check_objectives(spec, ModelStore(tmp_path / "cache"))


def test_the_docs_manifest_mixing_every_kind_of_objective_is_valid():
    from mergesearch_operator.spec import Objective

    text = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    block = next(b for b in text.split("```yaml\n")[1:] if b.startswith("objectives:"))
    objectives = [Objective.model_validate(o) for o in yaml.safe_load(block.split("```\n")[0])["objectives"]]
    assert [o.kind for o in objectives] == ["generate", "lm_eval", "code"]
    assert (
        re.search(objectives[2].answer_pattern or "", "```python\ndef f():\n    pass\n```").group(1).startswith("def")
    )
