"""The GPU paths, checked on a machine that has one: merging with `--device cuda`, the hf evaluator on CUDA.

Run where the package's dependencies and a CUDA torch are importable; writes a JSON report. It checks
that every merge method gives on CUDA what it gives on the CPU (float32 tolerance; DARE's draws come
from the device's generator, so there the check is that CUDA is deterministic), times a TIES merge of
a ~350M-parameter model on both, and evaluates the tiny-model world with the hf backend on CUDA against
the CPU's answers.

    python -m bench.gpu_check --world DIR --out report.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergesearch_trial_runner.evaluate.registry import open_evaluator
from mergesearch_trial_runner.merge.engine import merge_to_directory
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.tasks import TaskSpec, parse_samples, split_samples
from mergesearch_trial_runner.testbed.models import TinyLlama, random_llama

METHODS = {
    "linear": {"method": "linear", "sources": ["a", "b"], "params": {"weight": 0.5}},
    "task_arithmetic": {"method": "task_arithmetic", "base": True, "sources": ["a", "b"], "params": {"weight": 0.6}},
    "ties": {"method": "ties", "base": True, "sources": ["a", "b"], "params": {"weight": 0.5, "density": 0.3}},
    "dare_ties": {
        "method": "dare_ties",
        "base": True,
        "sources": ["a", "b"],
        "params": {"weight": 0.5, "density": 0.4},
    },
    "slerp": {"method": "slerp", "base": True, "sources": ["a"], "params": {"t": 0.3}},
}


def plan_for(models: dict[str, Path], layers: int, recipe: dict) -> MergePlan:
    layer_slice = {
        "method": recipe["method"],
        "sources": [{"model": m, "layers": [0, layers]} for m in recipe["sources"]],
        "params": recipe["params"],
    }
    if recipe.get("base"):
        layer_slice["base"] = {"model": "base", "layers": [0, layers]}
    return MergePlan.model_validate(
        {"models": {k: str(v) for k, v in models.items()}, "base_model": "base", "slices": [layer_slice], "seed": 1}
    )


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in directory.glob("*.safetensors"):
        state.update(load_file(file))
    return state


def check_methods(work: Path) -> dict:
    models = {n: random_llama(work / n, seed=i) for i, n in enumerate(("base", "a", "b"))}
    report = {}
    for name, recipe in METHODS.items():
        plan = plan_for(models, 4, recipe)
        outs = {}
        for device in ("cpu", "cuda", "cuda"):
            key = device if device not in outs else "cuda-again"
            merge_to_directory(plan, work / f"{name}-{key}", model_dirs=plan.models, device=device)
            outs[key] = tensors(work / f"{name}-{key}")
        cpu, cuda, again = outs["cpu"], outs["cuda"], outs["cuda-again"]
        report[name] = {
            "max_abs_diff_cpu_vs_cuda": max(float((cpu[k] - cuda[k]).abs().max()) for k in cpu),
            "cuda_deterministic": all(torch.equal(cuda[k], again[k]) for k in cuda),
        }
    return report


def time_large_merge(work: Path) -> dict:
    shape = TinyLlama(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    )
    models = {
        n: random_llama(work / f"large-{n}", seed=i, shape=shape, dtype=torch.bfloat16)
        for i, n in enumerate(("base", "a", "b"))
    }
    plan = plan_for(models, 24, METHODS["ties"])
    timings = {}
    for device in ("cpu", "cuda"):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        merge_to_directory(plan, work / f"large-{device}", model_dirs=plan.models, device=device)
        timings[device] = round(time.perf_counter() - started, 2)
    params = sum(t.numel() for t in tensors(models["base"]).values())
    return {"parameters": params, "seconds": timings, "cpu_over_cuda": round(timings["cpu"] / timings["cuda"], 2)}


def check_evaluator(world: Path) -> dict:
    report = {}
    for task in ("reverse", "sort", "shift"):
        spec = TaskSpec(name=task, data=str(world / "tasks" / f"{task}.search.jsonl"), max_new_tokens=8)
        samples = split_samples(
            spec,
            parse_samples((world / "tasks" / f"{task}.search.jsonl").read_text(), kind="generate", source=task),
            None,
        )["search"][:200]
        counts = {}
        for device in ("cpu", "cuda"):
            with open_evaluator("hf", model=world / "models" / task, settings={"device": device}) as evaluator:
                counts[device] = evaluator.evaluate(task=spec, samples=samples).correct
        report[task] = counts
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    work = Path(tempfile.mkdtemp())
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["methods"] = check_methods(work)
    report["evaluator_correct_counts"] = check_evaluator(Path(args.world))
    report["large_ties_merge"] = time_large_merge(work)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
