"""The merge engine on real tiny checkpoints: identities, LFS and DIS semantics, I/O, and bad inputs."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesearch_trial_runner.checkpoint import CheckpointError
from mergesearch_trial_runner.merge.engine import PLAN_FILE, merge_to_directory, merge_to_state_dict
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.plan.tensors import PlanError
from mergesearch_trial_runner.testbed.models import TinyLlama, random_llama


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def make_plan(models: dict[str, Path], slices: list[dict], **extra) -> MergePlan:
    return MergePlan.model_validate(
        {"models": {k: str(v) for k, v in models.items()}, "base_model": "base", "slices": slices, **extra}
    )


def whole(model: str, **params) -> dict:
    return {"model": model, "layers": [0, 4], "params": params}


def test_one_hot_linear_reproduces_a_model_bit_for_bit(models, tmp_path):
    plan = make_plan(models, [{"method": "linear", "sources": [whole("a", weight=1.0), whole("b", weight=0.0)]}])
    merge_to_directory(plan, tmp_path / "out", model_dirs=models)
    merged, original = tensors(tmp_path / "out"), tensors(models["a"])
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)


def test_task_arithmetic_with_lambda_zero_gives_the_base(models, tmp_path):
    plan = make_plan(
        models,
        [
            {
                "method": "task_arithmetic",
                "base": {"model": "base", "layers": [0, 4]},
                "sources": [whole("a", weight=0.7), whole("b", weight=0.3)],
                "params": {"lambda": 0.0},
            }
        ],
    )
    merge_to_directory(plan, tmp_path / "out", model_dirs=models)
    merged, base = tensors(tmp_path / "out"), tensors(models["base"])
    assert all(torch.equal(merged[k], base[k]) for k in base)


def test_dis_plan_of_one_model_reproduces_it_by_copying_bytes(models, tmp_path):
    slices = [{"method": "passthrough", "sources": [{"model": "a", "layers": [i, i + 1]}]} for i in range(4)]
    stats = merge_to_directory(make_plan(models, slices, base_model="a"), tmp_path / "out", model_dirs=models)
    merged, original = tensors(tmp_path / "out"), tensors(models["a"])
    assert all(torch.equal(merged[k], original[k]) for k in original)
    assert stats.raw_copies == stats.tensors


def test_sharded_input_reads_the_same_as_a_single_file(models, tmp_path):
    assert len(list(models["sharded"].glob("*.safetensors"))) > 2
    for name in ("a", "sharded"):
        plan = make_plan(
            models,
            [
                {
                    "method": "ties",
                    "base": {"model": "base", "layers": [0, 4]},
                    "sources": [whole(name, weight=1.0, density=0.3)],
                }
            ],
        )
        merge_to_directory(plan, tmp_path / name, model_dirs=models)
    single, sharded = tensors(tmp_path / "a"), tensors(tmp_path / "sharded")
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_output_is_sharded_with_an_index_and_loads_and_generates(models, tmp_path):
    plan = make_plan(
        models,
        [
            {
                "method": "ties",
                "base": {"model": "base", "layers": [0, 4]},
                "sources": [whole("a", weight=0.5, density=0.5), whole("b", weight=0.5, density=0.5)],
            }
        ],
    )
    out = tmp_path / "out"
    merge_to_directory(plan, out, model_dirs=models, max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 2 and all((out / f).exists() for f in shard_files)
    assert not list(out.glob(".*partial*"))
    assert MergePlan.from_json((out / PLAN_FILE).read_text()) == plan
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    generated = model.generate(**tokenizer("rev abc=", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == len(tokenizer("rev abc=")["input_ids"]) + 5


def test_in_memory_merge_equals_the_written_one(models, tmp_path):
    plan = make_plan(
        models,
        [
            {
                "method": "dare_ties",
                "base": {"model": "base", "layers": [0, 4]},
                "sources": [whole("a", weight=0.6, density=0.4), whole("b", weight=0.4, density=0.6)],
            }
        ],
        seed=3,
    )
    merge_to_directory(plan, tmp_path / "out", model_dirs=models)
    state, config, _ = merge_to_state_dict(plan, model_dirs=models)
    written = tensors(tmp_path / "out")
    assert all(torch.equal(state[k], written[k]) for k in written)
    assert config["num_hidden_layers"] == 4


def test_dare_gives_the_same_bits_for_the_same_plan_and_other_bits_for_another_seed(models, tmp_path):
    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        plan = make_plan(
            models,
            [
                {
                    "method": "dare_linear",
                    "base": {"model": "base", "layers": [0, 4]},
                    "sources": [whole("a", weight=1.0, density=0.5)],
                }
            ],
            seed=seed,
        )
        merge_to_directory(plan, tmp_path / name, model_dirs=models)
        return tensors(tmp_path / name)

    first, again, other = run(1, "first"), run(1, "again"), run(2, "other")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])


def test_lfs_groups_embeddings_follow_the_first_and_head_the_last(models, tmp_path):
    plan = make_plan(
        models,
        [
            {"method": "linear", "sources": [{"model": "a", "layers": [0, 2], "params": {"weight": 1.0}}]},
            {"method": "linear", "sources": [{"model": "b", "layers": [2, 4], "params": {"weight": 1.0}}]},
        ],
    )
    merge_to_directory(plan, tmp_path / "out", model_dirs=models)
    merged, a, b = tensors(tmp_path / "out"), tensors(models["a"]), tensors(models["b"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(merged["model.layers.2.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(merged["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])


def test_parameters_differ_per_tensor_group(models, tmp_path):
    one_hot = [{"filter": "self_attn", "value": 1.0}, {"filter": "mlp", "value": 0.0}, {"value": 0.5}]
    other = [{"filter": "self_attn", "value": 0.0}, {"filter": "mlp", "value": 1.0}, {"value": 0.5}]
    plan = make_plan(models, [{"method": "linear", "sources": [whole("a", weight=one_hot), whole("b", weight=other)]}])
    merge_to_directory(plan, tmp_path / "out", model_dirs=models)
    merged, a, b = tensors(tmp_path / "out"), tensors(models["a"]), tensors(models["b"])
    name = "model.layers.3.{}.weight"
    assert torch.equal(merged[name.format("self_attn.k_proj")], a[name.format("self_attn.k_proj")])
    assert torch.equal(merged[name.format("mlp.down_proj")], b[name.format("mlp.down_proj")])
    norm = name.format("input_layernorm")
    assert torch.allclose(merged[norm], (a[norm] + b[norm]) / 2)


def test_dis_stacks_renumbers_and_updates_the_config(models, tmp_path):
    order = [("a", 0), ("b", 0), ("a", 1), ("base", 2), ("b", 3), ("a", 3)]
    slices = [{"method": "passthrough", "sources": [{"model": m, "layers": [i, i + 1]}]} for m, i in order]
    merge_to_directory(make_plan(models, slices), tmp_path / "out", model_dirs=models)
    merged = tensors(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    for out_layer, (model, layer) in enumerate(order):
        source = tensors(models[model])
        key = "model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(merged[key.format(out_layer)], source[key.format(layer)])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 6


def test_dis_output_scale_folds_into_a_plain_checkpoint_that_matches_the_scaled_reference(models, tmp_path):
    """The paper scales each stacked layer's output hidden state (a custom Llama class in the reference
    code); the engine folds the scales into o_proj/down_proj. The plain checkpoint must compute the same."""
    order = [("a", 0), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]
    scales = [1.3, 0.7, 1.0, 0.8, 1.1]

    def slices(with_scales: bool):
        return [
            {
                "method": "passthrough",
                "sources": [{"model": m, "layers": [i, i + 1]}],
                "output_scale": s if with_scales else 1.0,
            }
            for (m, i), s in zip(order, scales, strict=True)
        ]

    merge_to_directory(make_plan(models, slices(True)), tmp_path / "folded", model_dirs=models)
    merge_to_directory(make_plan(models, slices(False)), tmp_path / "plain", model_dirs=models)

    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for layer, scale in zip(reference.model.layers, scales, strict=True):
        layer.register_forward_hook(
            lambda _m, _i, out, s=scale: out * s if isinstance(out, torch.Tensor) else (out[0] * s, *out[1:])
        )
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        expected, actual = reference(ids).logits, folded(ids).logits
        unscaled = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")(ids).logits
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(unscaled, expected, atol=1e-3)  # the scales do matter


def test_output_dtype_is_configurable(models, tmp_path):
    plan = make_plan(models, [{"method": "linear", "sources": [whole("a", weight=1.0)]}], dtype="bfloat16")
    merge_to_directory(plan, tmp_path / "out", model_dirs=models)
    merged = tensors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert torch.equal(merged["lm_head.weight"], tensors(models["a"])["lm_head.weight"].to(torch.bfloat16))


def test_tied_embeddings_stay_tied(tied_models, tmp_path):
    plan = make_plan(
        tied_models,
        [
            {
                "method": "task_arithmetic",
                "base": {"model": "base", "layers": [0, 4]},
                "sources": [whole("a", weight=0.5)],
            }
        ],
    )
    merge_to_directory(plan, tmp_path / "out", model_dirs=tied_models)
    assert "lm_head.weight" not in tensors(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tied_and_untied_models_do_not_mix(models, tied_models, tmp_path):
    mixed = {"base": models["base"], "a": tied_models["a"]}
    plan = make_plan(
        mixed,
        [
            {
                "method": "task_arithmetic",
                "base": {"model": "base", "layers": [0, 4]},
                "sources": [whole("a", weight=0.5)],
            }
        ],
    )
    with pytest.raises(PlanError, match=r"lacks tensor lm_head\.weight"):
        merge_to_directory(plan, tmp_path / "out", model_dirs=mixed)


# --- bad checkpoints -------------------------------------------------------------------------------------


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def ta_plan(models: dict[str, Path]) -> MergePlan:
    return make_plan(
        models,
        [
            {
                "method": "task_arithmetic",
                "base": {"model": "base", "layers": [0, 4]},
                "sources": [whole("a", weight=1.0)],
            }
        ],
    )


def test_truncated_file(models, tmp_path):
    broken = copy_model(models["a"], tmp_path / "a")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        merge_to_directory(ta_plan({**models, "a": broken}), tmp_path / "out", model_dirs={**models, "a": broken})
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_corrupt_header(models, tmp_path):
    broken = copy_model(models["a"], tmp_path / "a")
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        merge_to_directory(ta_plan(models), tmp_path / "out", model_dirs={**models, "a": broken})


def test_shape_mismatch_names_the_first_mismatching_tensor(models, tmp_path):
    wider = random_llama(tmp_path / "wide", seed=5, shape=TinyLlama(intermediate_size=320))
    with pytest.raises(PlanError) as info:
        merge_to_directory(ta_plan(models), tmp_path / "out", model_dirs={**models, "a": wider})
    assert info.value.field == "models.a"
    assert "model.layers.0.mlp.down_proj.weight has shape [128, 320]" in str(info.value)


def test_missing_tensor(models, tmp_path):
    broken = copy_model(models["a"], tmp_path / "a")
    state = load_file(broken / "model.safetensors")
    del state["model.layers.2.mlp.gate_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match=r"lacks tensor model\.layers\.2\.mlp\.gate_proj\.weight"):
        merge_to_directory(ta_plan(models), tmp_path / "out", model_dirs={**models, "a": broken})


def test_vocabulary_mismatch(models, tmp_path):
    broken = copy_model(models["a"], tmp_path / "a")
    state = load_file(broken / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], state[key][:2]])
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match="vocabulary size differs"):
        merge_to_directory(ta_plan(models), tmp_path / "out", model_dirs={**models, "a": broken})


def test_other_architecture(models, tmp_path):
    broken = copy_model(models["a"], tmp_path / "a")
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "mistral"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match="model_type is 'mistral' but 'base' has 'llama'"):
        merge_to_directory(ta_plan(models), tmp_path / "out", model_dirs={**models, "a": broken})


def test_pickled_weights_are_refused_unopened(models, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(models["a"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="never unpickles"):
        merge_to_directory(ta_plan(models), tmp_path / "out", model_dirs={**models, "a": pickled})
