"""Merges from resident experts, and merges computed straight into a running engine of either backend.

The promise: exactly the numbers of today's path (merge written to a checkpoint, the engine loads it).
Here, for every method and for LFS and DIS plans on the tiny world: the tensors merged from memory are
the bytes written to the checkpoint; an hf model that merged in place holds the same parameters,
generates the same token ids and gives the same log-likelihoods as the model a trial without a host
loads (`from_pretrained` of the merge in memory), in the checkpoint's dtype and cast to another; and
(slow) a vLLM engine that merged in place does the same against the engine that loaded the written
checkpoint, and an engine started on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import load_file

from mergesearch_operator.spaces import DepthwiseIntegration, LayerwiseFusion, ModelFacts
from mergesearch_trial_runner.checkpoint import Checkpoint
from mergesearch_trial_runner.evaluate.base import InMemoryModel
from mergesearch_trial_runner.evaluate.hf_backend import HFEvaluator, in_place_parameters
from mergesearch_trial_runner.evaluate.prompts import ContinuationRequest, GenerationRequest
from mergesearch_trial_runner.evaluate.settings import HFSettings
from mergesearch_trial_runner.merge.engine import (
    merge_to_directory,
    merge_to_state_dict,
    merged_tensors,
    open_checkpoints,
)
from mergesearch_trial_runner.merge.io import TensorReader
from mergesearch_trial_runner.merge.resident import ResidentModels
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.plan.methods import METHODS

EXPERT_WEIGHTS = (0.6, 0.3, 0.5)


def method_plan(world, method: str) -> MergePlan:
    """`method` over the whole tiny model, with every expert it takes and non-trivial parameters."""
    spec = METHODS[method]
    experts = list(world.experts)[: spec.max_sources or 3]
    picked = {"weight": EXPERT_WEIGHTS, "density": (0.5, 0.7, 0.9), "scale": (1.1,)}
    shared = {p.name: (0.4 if p.name == "t" else p.default) for p in spec.shared_params}
    sources = [
        {"model": e, "layers": [0, 4], "params": {p.name: picked[p.name][j] for p in spec.source_params}}
        for j, e in enumerate(experts)
    ]
    layer_slice = {"method": method, "sources": sources, "params": shared}
    if spec.needs_base:
        layer_slice["base"] = {"model": "base", "layers": [0, 4]}
    return MergePlan.model_validate(
        {"models": model_uris(world), "base_model": "base", "slices": [layer_slice], "seed": 7}
    )


def model_uris(world) -> dict[str, str]:
    return {"base": str(world.model("base")), **{e: str(world.model(e)) for e in world.experts}}


def space_plans(world, count: int = 2) -> dict[str, MergePlan]:
    """Random LFS plans (every searchable method) and DIS plans of the base's depth (4 layers: one block
    per position, rescaled), which an engine of that depth can take in place."""
    facts = ModelFacts(model_uris(world), tuple(world.experts), 4)
    searchable = [m for m, s in METHODS.items() if s.searchable]
    lfs = LayerwiseFusion(facts, methods=searchable, tensor_groups=["self_attn", "mlp"], groups=2, seed=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    plans = {f"lfs{i}": lfs.suggest(study.ask()) for i in range(count)}
    dis = DepthwiseIntegration(facts, seed=3)
    for i in range(count):
        params = {}
        for position in range(4):
            chosen = world.experts[(position + i) % len(world.experts)]
            params |= {f"p{position}.{e}": e == chosen for e in world.experts}
            params[f"p{position}.scale"] = 0.85 + 0.1 * position
        plans[f"dis{i}"] = dis.plan_of(params)
    return plans


def all_plans(world) -> dict[str, MergePlan]:
    return {**{m: method_plan(world, m) for m in METHODS if m != "passthrough"}, **space_plans(world)}


def dirs(plan: MergePlan) -> dict[str, Path]:
    return {name: Path(uri) for name, uri in plan.models.items()}


def test_a_merge_from_resident_experts_is_the_written_checkpoint_bit_for_bit(world, tmp_path):
    resident = ResidentModels()
    plans = all_plans(world)
    assert {s.method for p in plans.values() for s in p.slices} == set(METHODS)
    for name, plan in plans.items():
        checkpoints = open_checkpoints(plan, dirs(plan))
        placement = resident.make_resident(checkpoints, device=torch.device("cpu"), limit_bytes=None)
        assert placement.where == "cpu", placement.reason
        merge_to_directory(plan, tmp_path / name, model_dirs=dirs(plan))
        written = {}
        for file in sorted((tmp_path / name).glob("*.safetensors")):
            written.update(load_file(file))
        merged = dict(merged_tensors(plan, checkpoints, resident))
        assert list(merged) == list(written), name
        for tensor, value in merged.items():
            assert value.dtype == written[tensor].dtype and torch.equal(value, written[tensor]), (name, tensor)


def test_experts_that_do_not_fit_are_read_from_the_files_and_a_changed_file_is_read_again(world, tmp_path):
    plan = method_plan(world, "ties")
    checkpoints = open_checkpoints(plan, dirs(plan))
    resident = ResidentModels()
    refused = resident.make_resident(checkpoints, device=torch.device("cpu"), limit_bytes=1024)
    assert refused.where == "files" and "more than resident_gib" in refused.reason
    assert resident.nbytes == 0
    with TensorReader() as reader:
        from_files = dict(merged_tensors(plan, checkpoints, reader))
    resident.make_resident(checkpoints, device=torch.device("cpu"), limit_bytes=None)
    assert resident.nbytes == sum(i.nbytes for c in checkpoints.values() for i in c.tensors.values())
    assert all(torch.equal(v, from_files[k]) for k, v in merged_tensors(plan, checkpoints, resident))

    # A node cache entry replaced under the same path (another revision) is read again, not served stale.
    copied = {**dirs(plan), "base": tmp_path / "base"}
    (tmp_path / "base").mkdir()
    for file in dirs(plan)["base"].iterdir():
        (tmp_path / "base" / file.name).write_bytes(file.read_bytes())
    moved = plan.model_copy(update={"models": {k: str(v) for k, v in copied.items()}})
    checkpoints = open_checkpoints(moved, copied)
    resident.make_resident(checkpoints, device=torch.device("cpu"), limit_bytes=None)
    before = dict(merged_tensors(moved, checkpoints, resident))
    weights = tmp_path / "base" / "model.safetensors"
    state = load_file(weights)
    state = {k: v + 1 for k, v in state.items()}
    from safetensors.torch import save_file

    save_file(state, weights, metadata={"format": "pt"})
    checkpoints = open_checkpoints(moved, copied)
    resident.make_resident(checkpoints, device=torch.device("cpu"), limit_bytes=None)
    after = dict(merged_tensors(moved, checkpoints, resident))
    assert any(not torch.equal(before[k], after[k]) for k in before)


PROMPTS = ["rev abcde=", "sort dcba=", "shift abc=", "rev bbcad=dacbb\nrev cab="]


def hf_outputs(engine: HFEvaluator) -> dict[str, object]:
    """Greedy token ids, log-likelihoods and every parameter's bytes: what tells two models apart."""
    ids = [engine.prompts.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return {
        "tokens": engine._generate([GenerationRequest(prompt_ids=i, max_new_tokens=12) for i in ids], stop=[]),
        "loglikelihoods": engine._loglikelihoods(
            [ContinuationRequest(context_ids=i[:-3], continuation_ids=i[-3:]) for i in ids]
        ),
        "parameters": {n: v.detach().clone() for n, v in engine.model.state_dict().items()},
    }


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    pa, pb = a["parameters"], b["parameters"]
    assert isinstance(pa, dict) and isinstance(pb, dict)
    tensors_equal = pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    return tensors_equal and a["tokens"] == b["tokens"] and a["loglikelihoods"] == b["loglikelihoods"]


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_an_hf_model_that_merged_in_place_is_the_model_a_trial_loads(world, tmp_path, dtype):
    plans = all_plans(world)
    if dtype != "auto":  # cast from the checkpoints' float32: a few plans suffice
        plans = {name: plans[name] for name in ("ties", "dare_ties", "lfs0", "dis1")}
    settings = HFSettings(device="cpu", dtype=dtype)
    first = next(iter(plans))
    merge_to_directory(plans[first], tmp_path / first, model_dirs=dirs(plans[first]))
    engine = HFEvaluator(model=tmp_path / first, settings=settings)
    assert engine.can_merge_in_place
    seen = []
    for name, plan in plans.items():
        with HFEvaluator(
            model=InMemoryModel(*merge_to_state_dict(plan, model_dirs=dirs(plan))), settings=settings
        ) as own:
            expected = hf_outputs(own)  # a trial without a host: from_pretrained of the merge in memory
        report = engine.load_merge(plan, dirs(plan), device="cpu", limit_bytes=None)
        assert report["where"] == "cpu", report
        merged = hf_outputs(engine)
        assert same(merged, expected), name
        seen.append(merged)
    streamed = engine.load_merge(plans[first], dirs(plans[first]), device="cpu", limit_bytes=0)
    assert streamed["where"] == "files" and same(hf_outputs(engine), seen[0])
    engine.load_weights(tmp_path / first)  # a written merge, loaded in place
    assert same(hf_outputs(engine), seen[0])
    # The plans give models that differ: a merge that failed to load would be seen.
    assert len({json.dumps(o["loglikelihoods"]) for o in seen}) == len(plans)
    engine.close()


def test_hf_weights_go_in_place_only_where_the_parameters_are_named_as_the_checkpoint(tied_models):
    checkpoint = Checkpoint.open(tied_models["a"])
    assert "lm_head.weight" not in checkpoint.tensors  # tied: the embedding is both
    with HFEvaluator(model=tied_models["a"], settings=HFSettings(device="cpu")) as engine:
        names = set(checkpoint.tensors)
        parameters = in_place_parameters(engine.model, names)
        assert parameters is not None and set(parameters) == names
        assert in_place_parameters(engine.model, names | {"lm_head.weight"}) is None  # both names of one tensor
        assert in_place_parameters(engine.model, names - {"model.norm.weight"}) is None  # a parameter left stale
        assert in_place_parameters(engine.model, {*names, "model.extra.weight"}) is None  # not the model's
        # Weights of another model of the shape, in place, tie as from_pretrained tied them.
        engine.load_weights(tied_models["b"])
        with HFEvaluator(model=tied_models["b"], settings=HFSettings(device="cpu")) as loaded:
            assert same(hf_outputs(engine), hf_outputs(loaded))
            assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()


ENGINE_SCRIPT = """
import hashlib, json, sys
from pathlib import Path

import torch

from mergesearch_trial_runner.evaluate.prompts import ContinuationRequest, GenerationRequest
from mergesearch_trial_runner.evaluate.settings import VLLMSettings
from mergesearch_trial_runner.evaluate.vllm_backend import VLLMEvaluator
from mergesearch_trial_runner.merge.engine import merge_to_directory
from mergesearch_trial_runner.plan.ir import MergePlan


def parameters(worker):
    digest = hashlib.sha256()
    for name, value in sorted(worker.model_runner.get_model().named_parameters()):
        digest.update(name.encode() + value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main():
    job = json.loads(Path(sys.argv[1]).read_text())
    dirs = {k: Path(v) for k, v in job["model_dirs"].items()}
    plans = {name: MergePlan.model_validate_json(text) for name, text in job["plans"].items()}
    tokenizer_prompts = job["prompts"]
    written = lambda name: Path("written") / name
    first = next(iter(plans))
    merge_to_directory(plans[first], written(first), model_dirs=dirs)
    engine = VLLMEvaluator(model=written(first), settings=VLLMSettings.model_validate(job["settings"]))
    ids = [engine.prompts.tokenizer(p, add_special_tokens=False)["input_ids"] for p in tokenizer_prompts]
    generations = [GenerationRequest(prompt_ids=i, max_new_tokens=12) for i in ids]
    continuations = [ContinuationRequest(context_ids=i[:-3], continuation_ids=i[-3:]) for i in ids]

    def outputs():
        return {
            "tokens": engine._generate(generations, stop=[]),
            "loglikelihoods": engine._loglikelihoods(continuations),
            "parameters": engine.llm.collective_rpc(parameters)[0],
        }

    report = {"fresh": outputs(), "plans": {}}
    for name, plan in plans.items():
        if name != first:
            merge_to_directory(plan, written(name), model_dirs=dirs)
        engine.load_weights(written(name))
        from_checkpoint = outputs()
        where = engine.load_merge(plan, dirs, device="cpu", limit_bytes=None)["where"]
        report["plans"][name] = {"checkpoint": from_checkpoint, "in_place": outputs(), "where": where}
    streamed = engine.load_merge(plans[first], dirs, device="cpu", limit_bytes=0)["where"]
    report["streamed"] = {"where": streamed, **outputs()}
    Path(sys.argv[2]).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_an_engine_that_merged_in_place_is_the_engine_that_loaded_the_checkpoint(world, tmp_path):
    plans = all_plans(world)
    (tmp_path / "job.py").write_text(ENGINE_SCRIPT)
    job = {
        "model_dirs": {k: str(v) for k, v in dirs(next(iter(plans.values()))).items()},
        "plans": {name: plan.model_dump_json() for name, plan in plans.items()},
        "settings": {"enforce_eager": True, "kv_cache_gib": 1},
        "prompts": PROMPTS,
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, "job.py", "job.json", "out.json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
        cwd=tmp_path,  # never the repository root, whose operator/ would shadow the standard library's
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "out.json").read_text())
    first = next(iter(plans))
    assert report["plans"][first]["in_place"] == report["fresh"]  # an engine started on the checkpoint
    for name, outcome in report["plans"].items():
        assert outcome["where"] == "cpu"
        assert outcome["in_place"] == outcome["checkpoint"], name
    streamed = report.pop("streamed")
    assert streamed.pop("where") == "files" and streamed == report["fresh"]
    # The plans give models that differ: a merge that failed to load would be seen.
    assert len({o["in_place"]["parameters"] for o in report["plans"].values()}) == len(plans)
    assert len({json.dumps(o["in_place"]["tokens"]) for o in report["plans"].values()}) > 1
