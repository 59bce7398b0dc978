"""Search spaces: conditional parameters, plans rebuilt from stored parameters, the initial design."""

from __future__ import annotations

import optuna
import pytest
import torch
from safetensors.torch import load_file

from mergesearch_operator.spaces import DepthwiseIntegration, LayerwiseFusion, ModelFacts, Skip, build_space
from mergesearch_operator.spaces.base import SpaceError
from mergesearch_operator.spaces.baselines import HAND_RECIPES, baselines
from mergesearch_operator.spaces.lfs import layer_groups
from mergesearch_operator.spec import LFSSpace, parse_manifest
from mergesearch_trial_runner.merge.engine import merge_to_directory
from mergesearch_trial_runner.plan.methods import METHODS, MethodSpec, ParamScope, ParamSpec, Searched
from mergesearch_trial_runner.testbed.models import random_llama
from tests.search.searches import FACTS, manifest


def test_layer_groups_cover_every_layer_once():
    assert layer_groups(10, groups=4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert layer_groups(10, per_group=4) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="do not fit"):
        layer_groups(4, groups=5)


def test_lfs_asks_only_for_the_chosen_methods_parameters():
    space = LayerwiseFusion(FACTS, methods=["linear", "ties", "slerp"], tensor_groups=["self_attn", "mlp"], groups=2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        plan = space.suggest(trial)
        for g in range(2):
            method = trial.params[f"g{g}.method"]
            others = {p for p in trial.params if p.startswith(f"g{g}.") and p != f"g{g}.method"}
            assert all(p.startswith(f"g{g}.{method}.") for p in others), others
        assert plan.num_layers == 4
        study.tell(trial, 0.0)
    ties_params = [p for p in study.trials[0].distributions if ".ties." in p]
    # per tensor group (3): a weight per expert (3), density, lambda, normalised or summed
    assert len(ties_params) in (0, 18, 36)


def test_a_method_declared_in_one_place_is_searchable(monkeypatch):
    """Declaring a method (its parameters and how they are searched) is all it takes for a manifest to
    list it and for the LFS space to search it, with its own ranges."""
    toy = MethodSpec(
        name="toy_average",
        needs_base=False,
        params=(
            ParamSpec(name="weight", scope=ParamScope.SOURCE, search=Searched(low=0.5, high=3.0, per_source=True)),
        ),
        searchable=True,
    )
    monkeypatch.setitem(METHODS, toy.name, toy)
    document = manifest(searchSpace={"type": "LFS", "layerGroups": 2, "methods": ["toy_average", "ties"]})
    spec = parse_manifest(document).spec
    space = build_space(spec, FACTS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        plan = space.suggest(trial)
        study.tell(trial, 0.0)
        for layer_slice in plan.slices:
            seen.add(layer_slice.method)
            if layer_slice.method == "toy_average":
                assert layer_slice.base is None  # it needs none
                weights = [c.value for source in layer_slice.sources for c in source.params["weight"]]
                assert len(weights) == 3 * 3 and all(0.5 <= w <= 3.0 for w in weights)
    assert seen == {"toy_average", "ties"}


def test_plans_are_rebuilt_from_stored_parameters():
    space = LayerwiseFusion(
        FACTS, methods=["linear", "task_arithmetic", "ties", "dare_ties", "slerp"], tensor_groups=["mlp"], groups=2
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        trial = study.ask()
        plan = space.suggest(trial)
        study.tell(trial, 0.0)
        assert space.plan_of(study.trials[-1].params) == plan


def test_dis_stacks_picked_experts_in_order_and_falls_back_to_the_base():
    space = DepthwiseIntegration(FACTS, max_depth=12)
    params = {}
    for p in range(4):
        for e in FACTS.experts:
            params[f"p{p}.{e}"] = False
        params[f"p{p}.scale"] = 1.0
    params.update({"p1.sort": True, "p1.reverse": True, "p1.order.reverse+sort": "sort+reverse", "p1.scale": 1.1})
    plan = space.plan_of(params)
    models = [(s.sources[0].model, s.sources[0].layers[0], s.output_scale) for s in plan.slices]
    assert models == [("base", 0, 1.0), ("sort", 1, 1.0), ("reverse", 1, 1.1), ("base", 2, 1.0), ("base", 3, 1.0)]
    assert isinstance(DepthwiseIntegration(FACTS, max_depth=4).plan_of(params), Skip)


def test_dis_refuses_a_depth_cap_below_the_base_before_any_candidate():
    """Every DIS stack is at least the base's depth, so a lower cap would skip every candidate."""
    with pytest.raises(SpaceError, match="set maxDepth to at least 4") as info:
        DepthwiseIntegration(FACTS, max_depth=3)
    assert info.value.field == "maxDepth"
    assert DepthwiseIntegration(FACTS, max_depth=4).max_depth == 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    uris = {name: str(random_llama(root / name, seed=i)) for i, name in enumerate(("base", *FACTS.experts))}
    return ModelFacts(model_uris=uris, experts=FACTS.experts, num_layers=4), root


def merged(plan, out):
    merge_to_directory(plan, out, model_dirs=plan.models)
    return load_file(next(out.glob("*.safetensors")))


def test_lfs_initial_design_merges_to_each_expert_and_every_hand_recipe(tiny):
    """The default space expresses every hand recipe (summed task vectors and summed TIES included), and
    the initial design merges to exactly the tensors of the recipe's whole-model plan."""
    facts, root = tiny
    default_methods = list(LFSSpace.model_validate({"type": "LFS"}).methods)
    space = LayerwiseFusion(facts, methods=default_methods, tensor_groups=["self_attn", "mlp"], groups=2)
    design = [space.plan_of(params) for params in space.initial_params()]
    expected = baselines(facts)
    labels = [f"expert:{e}" for e in facts.experts] + [recipe.label for recipe in HAND_RECIPES]
    assert len(design) == len(labels) == len(expected)
    for index, (label, plan) in enumerate(zip(labels, design, strict=True)):
        ours, theirs = merged(plan, root / f"design{index}"), merged(expected[label], root / f"baseline{index}")
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=1e-6, msg=f"{label}: {name}")
    summed = merged(expected["task_arithmetic_sum"], root / "sum")
    mean = merged(expected["task_arithmetic"], root / "mean")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(summed[name], mean[name])  # the two recipes differ


def test_lfs_initial_design_leaves_out_what_the_space_cannot_express():
    space = LayerwiseFusion(FACTS, methods=["linear", "ties"], tensor_groups=["mlp"], groups=2)
    expressible = [r.label for r in HAND_RECIPES if space.recipe_params(r) is not None]
    assert expressible == ["linear", "ties", "ties_sum"]
    assert len(space.initial_params()) == len(FACTS.experts) + 3


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"])
def test_every_lfs_space_starts_with_each_expert_alone(tiny, method):
    """Without `linear` a space still expresses each expert alone (one-hot weights, neutral parameters; SLERP
    at t = 1), and its initial design starts with them."""
    facts, root = tiny
    space = LayerwiseFusion(facts, methods=[method], tensor_groups=["mlp"], groups=2)
    design = space.initial_params()
    for index, expert in enumerate(facts.experts):
        assert design[index] == space.expert_params(expert)
        ours = merged(space.plan_of(design[index]), root / f"{method}-alone{index}")
        theirs = load_file(root / expert / "model.safetensors")
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=1e-6, msg=f"{method} {expert}: {name}")


def test_dis_initial_design_reproduces_each_expert(tiny):
    facts, root = tiny
    space = DepthwiseIntegration(facts)
    for index, params in enumerate(space.initial_params()):
        ours = merged(space.plan_of(params), root / f"dis{index}")
        expert = load_file(root / facts.experts[index] / "model.safetensors")
        assert all(torch.equal(ours[name], expert[name]) for name in expert)
