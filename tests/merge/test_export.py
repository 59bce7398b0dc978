"""The exported mergekit recipe gives the same tensors through mergekit 0.1.5 as the engine gives for the plan.

Plans are built as the LFS space builds them (a method per layer group, a value per tensor group); the
trial runner's tests do not import the operator, so they are written out here. mergekit runs from its
own environment: MERGEKIT_YAML points at its `mergekit-yaml`, and `mergekit-multi` lies beside it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergesearch_trial_runner.merge.engine import merge_to_directory
from mergesearch_trial_runner.plan.export import NotExpressible, mergekit_recipe, to_mergekit_yaml
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.plan.mergekit import from_mergekit_yaml
from tests.merge.tensors import assert_same_tensors

EXPERTS = ("a", "b")


def per_group(attn: Any, mlp: Any, rest: Any) -> list[dict[str, Any]]:
    """A value per tensor group, as LFS writes it: `self_attn`, `mlp`, then the rest."""
    return [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp}, {"value": rest}]


def group(method: str, layers: tuple[int, int], params: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """One LFS layer group: the experts as sources, the base where the method needs one."""
    layer_slice: dict[str, Any] = {
        "method": method,
        "sources": [{"model": e, "layers": list(layers), "params": {"weight": weights[e]}} for e in EXPERTS],
        "params": params,
    }
    if method != "linear":
        layer_slice["base"] = {"model": "base", "layers": list(layers)}
    return layer_slice


def lfs_plan(models: dict[str, Path], slices: list[dict[str, Any]], **extra: Any) -> MergePlan:
    return MergePlan.model_validate(
        {"models": {n: str(models[n]) for n in ("base", *EXPERTS)}, "base_model": "base", "slices": slices} | extra
    )


def single_method(models: dict[str, Path]) -> MergePlan:
    """Every group TIES, with values per group and per tensor group."""
    return lfs_plan(
        models,
        [
            group(
                "ties",
                (0, 2),
                {"density": per_group(0.5, 0.3, 0.9), "lambda": per_group(1.2, 0.8, 1.0), "normalize": True},
                {"a": per_group(0.7, 0.2, 0.5), "b": per_group(0.4, 0.9, 0.5)},
            ),
            group(
                "ties",
                (2, 4),
                {
                    "density": per_group(0.3, 1.0, 0.6),
                    "lambda": per_group(0.6, 1.4, 1.1),
                    "normalize": per_group(False, True, False),
                },
                {"a": per_group(0.1, 0.6, 0.3), "b": per_group(0.8, 0.3, 0.9)},
            ),
        ],
        dtype="float32",
    )


def mixed_methods(models: dict[str, Path]) -> MergePlan:
    """Four one-layer groups, each with its own method (slerp between two experts, as LFS's pairs do)."""
    return lfs_plan(
        models,
        [
            group(
                "task_arithmetic",
                (0, 1),
                {"lambda": per_group(1.5, 0.7, 1.1)},
                {"a": per_group(0.3, 0.8, 0.5), "b": per_group(0.6, 0.1, 0.5)},
            ),
            group(
                "ties",
                (1, 2),
                {"density": per_group(0.4, 0.7, 0.2), "lambda": per_group(0.9, 1.3, 1.0), "normalize": False},
                {"a": per_group(0.5, 0.2, 0.9), "b": per_group(0.3, 0.7, 0.4)},
            ),
            group("linear", (2, 3), {}, {"a": per_group(0.2, 0.9, 0.6), "b": per_group(0.7, 0.4, 0.1)}),
            {
                "method": "slerp",
                "base": {"model": "a", "layers": [3, 4]},
                "sources": [{"model": "b", "layers": [3, 4]}],
                "params": {"t": per_group(0.2, 0.8, 0.5)},
            },
        ],
        dtype="float32",
    )


def scaled_merge(models: dict[str, Path]) -> MergePlan:
    """DIS output scales on merged (not copied) layers, one of them inside a two-layer group."""
    weights = {"a": per_group(0.3, 0.6, 0.5), "b": per_group(0.9, 0.2, 0.5)}
    return lfs_plan(
        models,
        [
            group("linear", (0, 2), {}, weights) | {"output_scale": 1.25},
            group("task_arithmetic", (2, 4), {"lambda": 0.8}, weights) | {"output_scale": 0.5},
        ],
        dtype="float32",
    )


def head_from_first_group(models: dict[str, Path]) -> MergePlan:
    """The final norm and lm_head follow the first group (as a mergekit import of a gradient can make)."""
    return lfs_plan(
        models,
        [
            group("linear", (0, 2), {}, {"a": 0.2, "b": 0.8}),
            group("linear", (2, 4), {}, {"a": 0.9, "b": 0.1}),
        ],
        head_slice=0,
    )


def run_mergekit(recipe_file: Path, out: Path, command: str, bin_dir: Path) -> None:
    if command == "mergekit-yaml":
        args = [str(bin_dir / command), str(recipe_file), str(out)]
    else:
        args = [str(bin_dir / command), str(recipe_file), "--intermediate-dir", str(out.parent / "parts")]
        args += ["--out-path", str(out)]
    done = subprocess.run([*args, "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "command"),
    [
        (single_method, "mergekit-yaml"),
        (mixed_methods, "mergekit-multi"),
        (scaled_merge, "mergekit-multi"),
        (head_from_first_group, "mergekit-multi"),
    ],
    ids=["single-method", "mixed-methods", "dis-scales", "head-slice"],
)
def test_mergekit_reproduces_the_plan(build, command, models, tmp_path, mergekit_yaml):
    plan = build(models)
    recipe = mergekit_recipe(plan)
    assert recipe.command == command
    assert recipe.text.startswith(f"# Written by MergeSearch; `{command} {recipe.file_name}")
    recipe_file = tmp_path / recipe.file_name
    recipe_file.write_text(recipe.text)
    run_mergekit(recipe_file, tmp_path / "mergekit", command, mergekit_yaml.parent)
    merge_to_directory(plan, tmp_path / "ours", model_dirs={n: Path(p) for n, p in plan.models.items()})
    assert_same_tensors(tmp_path / "ours", tmp_path / "mergekit")


def test_a_single_recipe_reads_back_as_the_plan(models):
    """`mergesearch merge mergekit.yaml` merges the plan the recipe was exported from."""
    plan = single_method(models)
    recipe = mergekit_recipe(plan)
    assert recipe.file_name == "mergekit.yaml"
    back = from_mergekit_yaml(recipe.text)
    assert back.slices == plan.slices
    assert (back.models, back.base_model, back.dtype) == (plan.models, plan.base_model, plan.dtype)


def test_mixed_methods_are_one_intermediate_per_method_and_a_passthrough(models):
    documents = list(yaml.safe_load_all(mergekit_recipe(mixed_methods(models)).text))
    assert [d.get("name") for d in documents] == [
        "part0-task-arithmetic",
        "part1-ties",
        "part2-linear",
        "part3-slerp",
        None,
    ]
    final = documents[-1]
    assert final["merge_method"] == "passthrough"
    assert [s["sources"] for s in final["slices"]] == [
        [{"model": f"part{i}-{m}", "layer_range": [0, 1]}]
        for i, m in enumerate(("task-arithmetic", "ties", "linear", "slerp"))
    ]


def test_groups_of_one_method_share_an_intermediate_and_keep_embed_and_head(models):
    weights = {"a": 0.5, "b": 0.5}
    plan = lfs_plan(
        models,
        [
            group("linear", (0, 1), {}, weights),
            group("ties", (1, 2), {}, weights),
            group("linear", (2, 4), {}, weights),
        ],
    )
    *parts, final = yaml.safe_load_all(mergekit_recipe(plan).text)
    assert [(p["name"], len(p["slices"])) for p in parts] == [("part0-linear", 2), ("part1-ties", 1)]
    assert [s["sources"][0]["layer_range"] for s in final["slices"]] == [[0, 1], [0, 1], [1, 3]]
    assert [s["sources"][0]["model"] for s in final["slices"]] == ["part0-linear", "part1-ties", "part0-linear"]
    assert "dtype" not in final  # the plan keeps the inputs' dtype


def test_dis_scales_on_merged_layers_go_to_the_final_passthrough(models):
    plan = lfs_plan(
        models,
        [
            group("linear", (0, 2), {}, {"a": 1.0, "b": 1.0}) | {"output_scale": 2.0},
            group("linear", (2, 4), {}, {"a": 1.0, "b": 1.0}),
        ],
    )
    recipe = mergekit_recipe(plan)
    assert recipe.command == "mergekit-multi"
    final = list(yaml.safe_load_all(recipe.text))[-1]
    scales = [s["sources"][0].get("parameters", {}).get("scale", [{"value": 1.0}])[0]["value"] for s in final["slices"]]
    assert scales == [1.0, 0.5, 0.25]  # layer 0 unscaled, layer 1 after one doubling, layers 2-3 after two


def test_what_mergekit_cannot_reproduce_is_refused_with_the_reason(models):
    dare = lfs_plan(
        models,
        [group("ties", (0, 2), {}, {"a": 0.5, "b": 0.5}), group("dare_ties", (2, 4), {}, {"a": 0.5, "b": 0.5})],
    )
    with pytest.raises(NotExpressible, match=r"slices\[1\] uses 'dare_ties'"):
        mergekit_recipe(dare)
    assert to_mergekit_yaml(dare) is None
    twice = lfs_plan(models, [{"method": "linear", "sources": [{"model": "a", "layers": [0, 4]}] * 2}])
    with pytest.raises(NotExpressible, match="lists a model twice"):
        mergekit_recipe(twice)
