"""A user's mergekit recipe gives the same tensors through `mergesearch merge` as through mergekit 0.1.5.

mergekit runs from its own virtual environment (it pins other versions than ours); `make test` creates it
and points MERGEKIT_YAML at its `mergekit-yaml`.
"""

from __future__ import annotations

import subprocess

import pytest

from mergesearch_operator.cli import main as mergesearch
from mergesearch_trial_runner.plan.mergekit import MergekitError, from_mergekit_yaml
from tests.merge.tensors import assert_same_tensors

RECIPES = {
    "linear": """
models:
  - model: {a}
    parameters: {{weight: [1.0, 0.2]}}
  - model: {b}
    parameters:
      weight: [{{filter: self_attn, value: 0.3}}, {{value: 0.5}}]
merge_method: linear
dtype: float32
""",
    "task_arithmetic": """
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: [0.1, 0.9]}}
merge_method: task_arithmetic
base_model: {base}
parameters: {{lambda: [1.0, 0.5]}}
dtype: float32
""",
    "ties": """
models:
  - model: {base}
  - model: {a}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {b}
    parameters:
      weight: [{{filter: mlp, value: 0.2}}, {{value: 0.9}}]
      density: [0.2, 0.9]
merge_method: ties
base_model: {base}
parameters: {{normalize: true, lambda: 0.8, int8_mask: true}}
dtype: float32
""",
    "slerp": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "passthrough": """
slices:
  - sources:
    - model: {base}
      layer_range: [0, 3]
  - sources:
    - model: {a}
      layer_range: [1, 4]
      parameters:
        scale:
          - filter: o_proj
            value: 0.5
          - filter: down_proj
            value: [0.5, 1.0]
          - value: 1.0
merge_method: passthrough
dtype: float32
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_same_tensors_as_mergekit(method, models, tmp_path, mergekit_yaml):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES[method].format(**{k: str(v) for k, v in models.items()}))
    subprocess.run([mergekit_yaml, str(recipe), str(tmp_path / "mergekit"), "--quiet"], check=True, capture_output=True)
    assert mergesearch(["merge", str(recipe), str(tmp_path / "ours")]) == 0
    assert_same_tensors(tmp_path / "ours", tmp_path / "mergekit")


def test_unsupported_recipe_parts_are_refused_by_name(models):
    base = str(models["base"])
    with pytest.raises(MergekitError, match="merge_method: 'model_stock' is not supported"):
        from_mergekit_yaml(f"models: [{{model: {base}}}]\nmerge_method: model_stock\n")
    with pytest.raises(MergekitError, match="tokenizer_source: only `base`"):
        from_mergekit_yaml(
            f"models: [{{model: {base}, parameters: {{weight: 1}}}}]\nmerge_method: linear\ntokenizer_source: union\n"
        )
    with pytest.raises(MergekitError, match="not a local model directory"):
        from_mergekit_yaml("models: [{model: some-org/some-model, parameters: {weight: 1}}]\nmerge_method: linear\n")
    with pytest.raises(MergekitError, match="LoRA"):
        from_mergekit_yaml(f"models: [{{model: {base}+lora, parameters: {{weight: 1}}}}]\nmerge_method: linear\n")
    with pytest.raises(MergekitError, match="parameter 'gamma' does not exist for 'ties'"):
        from_mergekit_yaml(
            f"models: [{{model: {models['a']}, parameters: {{weight: 1, gamma: 0.1}}}}]\n"
            f"merge_method: ties\nbase_model: {base}\n"
        )
    with pytest.raises(MergekitError, match="merge_method: Field required"):
        from_mergekit_yaml(f"models: [{{model: {base}}}]\nmerge_mehtod: linear\n")
