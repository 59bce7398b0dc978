"""Resident experts and in-place merges against today's written checkpoints, side by side, as ratios.

Two measurements, each in one run:

- `smollm2`: a lowest-rung trial as `mergesearch run` runs it (a child of the vllm fork server, whose
  engine host keeps the engine), on SmolLM2-135M-Instruct with three experts (`bench.experts`), 100 chat
  prompts of 64 new tokens on vLLM's CPU backend. `written`: the trial writes its merge to scratch and the
  engine reloads it (`merge_in_place: false`, the path before resident experts); `resident`: the engine
  host merges from the experts it keeps into the engine. Per plan (TIES, the breakdown benchmark's;
  DARE-TIES, whose random drop no residency can spare; linear), the modes alternate over rounds and take turns at
  going first; each host's first resident trial (reading the experts, sorting TIES's task vectors) is
  timed apart. Reported: medians of each phase, the fixed share (everything but evaluating, over the
  trial's whole life) and the trial's time as a ratio to `written`.
- `smollm2_hf`: the same with the `hf` backend (transformers, bf16, batches of 64). `own_model`: the
  trial merges into memory and loads a model of its own (`keep_engine: false`, the path before hf's
  engine host); `resident`: the engine host keeps the loaded model and merges into its parameters.
- `llama1b`: merge-to-ready at Llama-3.2-1B's shapes (random bf16 weights made here: a base and three
  experts, 2.5 GB each), task arithmetic of the three, into a running vLLM engine, both paths merging
  on its device (the CPU here; on a GPU node, the GPU): `written` (merge_to_directory, then the engine
  reloads the directory) against `resident` (`load_merge`), with each path's peak memory above what was
  in use before it (the process's on CPU, the device's on a GPU), and what the resident experts hold.
  `written` runs first, so that the page cache holds its checkpoints.

    python -m bench.resident_merge [--part smollm2 smollm2_hf llama1b] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.experts import make_experts
from bench.trial_breakdown import arithmetic_task, run_forked, ties_plan
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import TrialResult, TrialSpec

GIB = 1 << 30
# Llama-3.2-1B's config (shapes only); tied embeddings as the real one.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def with_method(plan: MergePlan, method: str) -> MergePlan:
    """The breakdown benchmark's plan with another method (linear: no base, the weights alone)."""
    data = plan.model_dump()
    data["slices"][0]["method"] = method
    if method == "linear":
        data["slices"][0]["base"] = None
        for source in data["slices"][0]["sources"]:
            source["params"] = {"weight": source["params"]["weight"]}
    return MergePlan.model_validate(data)


# Per backend, today's path (the ratio's denominator) and the resident one, as trial settings.
MODES = {
    "vllm": {"written": {"merge_in_place": False}, "resident": {}},
    "hf": {
        "own_model": {"device": "cpu", "batch_size": 64, "keep_engine": False},
        "resident": {"device": "cpu", "batch_size": 64},
    },
}


def smollm2(rounds: int, samples: int, backend: str) -> dict:
    from mergesearch_operator.executors.local import LocalExecutor

    root = Path(".cache/bench/merge").absolute()
    make_experts(root)
    scratch = Path(tempfile.mkdtemp(prefix="ms-resident-"))
    task = {
        "name": "arith",
        "data": str(arithmetic_task(scratch / "arith.jsonl", samples * 2)),
        "test_fraction": 0.1,
        "chat_template": True,
        "max_new_tokens": 64,
        "answer_pattern": r"(-?\d+)\D*$",
    }
    plans = {method: with_method(ties_plan(root), method) for method in ("ties", "dare_ties", "linear")}
    modes = MODES[backend]
    before = next(iter(modes))

    def spec_for(plan: str, mode: str, name: str) -> TrialSpec:
        return TrialSpec(
            name=name,
            plan=plans[plan],
            tasks=[task],
            ranges={"arith": (0, samples)},
            backend=backend,
            engine_args=modes[mode],
            device="cpu",
            cache_dir=str(scratch / "cache"),
            scratch_dir=str(scratch / "runs" / name),
        )

    def row(result: TrialResult, wall: float) -> dict:
        timings = dict(result.timings)
        return {
            "name": result.name,
            "merge": timings.get("merge", 0.0),
            "load": timings["load"],
            "evaluate": timings["evaluate"],
            "wall": round(wall, 3),
            "fixed_share": round((wall - timings["evaluate"]) / wall, 3),
            "generated_tokens": result.generated_tokens,
        }

    executor = LocalExecutor(scratch / "work", timeout_seconds=600, cache_dir=scratch / "cache", backend=backend)
    results: dict = {}
    try:
        # The engine starts (the first run that asks the host), then the resident experts are read and TIES's
        # task vectors sorted (the first merge in place): both timed apart.
        first = {mode: row(*run_forked(executor, spec_for("ties", mode, f"first-{mode}"))) for mode in modes}
        if "keep_engine" in modes[before]:  # today's path starts no engine in the host: the first merge is next
            first["resident, experts read"] = row(*run_forked(executor, spec_for("ties", "resident", "first-read")))
        print("first", json.dumps(first), flush=True)
        for plan in plans:
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for round_ in range(rounds):
                order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
                for mode in order:
                    runs[mode].append(row(*run_forked(executor, spec_for(plan, mode, f"{plan}-{mode}-{round_}"))))
                print(plan, round_, json.dumps({m: r[-1] for m, r in runs.items()}), flush=True)
            in_host(runs["resident"], executor.engine_host_log.read_text())
            medians = {
                m: {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "name"}
                for m, rows in runs.items()
            }
            results[plan] = {
                "medians": medians,
                f"resident_over_{before}": round(medians["resident"]["wall"] / medians[before]["wall"], 3),
                "rounds": runs,
            }
        results["first_runs"] = first
        log = executor.engine_host_log.read_text()
        results["placement"] = [line for line in log.splitlines() if line.startswith("resident experts:")]
    finally:
        executor.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def in_host(rows: list[dict], log: str) -> None:
    """Add to each resident run's row the engine host's own split of its load: computing the merge and the
    engine's loading of it (the host's log line for the run)."""
    split = {
        match[1]: (float(match[2]), float(match[3]))
        for match in re.finditer(
            r"merged in place for \S*/runs/([^/]+)/scratch/merged in \S+ s \(merge (\S+) s, load (\S+) s\)", log
        )
    }
    for row in rows:
        row["host_merge"], row["host_load"] = split[row["name"]]


def make_llama1b(root: Path) -> dict[str, Path]:
    """A base and three experts at Llama-3.2-1B's shapes: random bf16 weights (experts: base + 2% noise)."""
    import torch
    from safetensors.torch import save_file

    from mergesearch_trial_runner.checkpoint import CARRIED_FILES
    from mergesearch_trial_runner.testbed.smollm2 import export_smollm2

    tokenizer = root / "tokenizer"
    export_smollm2(tokenizer)  # its tokenizer files: vLLM needs one, the bench never tokenizes
    c = LLAMA_1B
    kv = c["num_key_value_heads"] * c["head_dim"]
    layer = {
        "self_attn.q_proj.weight": (c["hidden_size"], c["hidden_size"]),
        "self_attn.k_proj.weight": (kv, c["hidden_size"]),
        "self_attn.v_proj.weight": (kv, c["hidden_size"]),
        "self_attn.o_proj.weight": (c["hidden_size"], c["hidden_size"]),
        "mlp.gate_proj.weight": (c["intermediate_size"], c["hidden_size"]),
        "mlp.up_proj.weight": (c["intermediate_size"], c["hidden_size"]),
        "mlp.down_proj.weight": (c["hidden_size"], c["intermediate_size"]),
        "input_layernorm.weight": (c["hidden_size"],),
        "post_attention_layernorm.weight": (c["hidden_size"],),
    }
    shapes = {
        "model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
        "model.norm.weight": (c["hidden_size"],),
    }
    for i in range(c["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    dirs = {name: root / name for name in ("base", "e1", "e2", "e3")}
    for seed, directory in enumerate(dirs.values()):
        if (directory / "model.safetensors").exists():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        base_generator = torch.Generator().manual_seed(0)
        noise_generator = torch.Generator().manual_seed(seed)
        state = {}
        for tensor, shape in shapes.items():
            values = torch.randn(shape, generator=base_generator) * 0.02
            if seed:
                values += torch.randn(shape, generator=noise_generator) * 0.0004
            state[tensor] = values.to(torch.bfloat16)
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(LLAMA_1B))
        for file in CARRIED_FILES:
            if (tokenizer / file).exists() and file != "generation_config.json":
                shutil.copy(tokenizer / file, directory / file)
    return dirs


class PeakMemory:
    """Peak memory in use while inside, above what was in use on entry (sampled every 10 ms): on CPU the
    process's resident memory; on a GPU the device's, whichever process holds it (vLLM's worker runs in a
    process of its own there, with the resident experts)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        self.start = self._used()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _used(self) -> int:
        if self.device == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info()
            return total - free
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._used())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())

    @property
    def above_entry_gib(self) -> float:
        return round((self.peak - self.start) / GIB, 2)


def llama1b(rounds: int) -> dict:
    from mergesearch_trial_runner.evaluate.settings import VLLMSettings
    from mergesearch_trial_runner.evaluate.vllm_backend import VLLMEvaluator
    from mergesearch_trial_runner.merge.engine import merge_to_directory

    root = Path(".cache/bench/llama1b").absolute()
    dirs = make_llama1b(root)
    plan = MergePlan.model_validate(
        {
            "models": {name: str(path) for name, path in dirs.items()},
            "base_model": "base",
            "slices": [
                {
                    "method": "task_arithmetic",
                    "base": {"model": "base", "layers": [0, 16]},
                    "sources": [
                        {"model": e, "layers": [0, 16], "params": {"weight": w}}
                        for e, w in (("e1", 0.5), ("e2", 0.3), ("e3", 0.4))
                    ],
                }
            ],
        }
    )
    scratch = Path(tempfile.mkdtemp(prefix="ms-llama1b-", dir=root))
    merged = scratch / "merged"
    merge_to_directory(plan, merged, model_dirs=dirs)
    settings = VLLMSettings.model_validate({"kv_cache_gib": 1, "max_model_len": 512})
    engine = VLLMEvaluator(model=merged, settings=settings)
    device = engine.device  # both paths merge where the engine runs: on a GPU node, on the GPU
    report: dict = {
        "device": device,
        "method": "task_arithmetic, 3 experts",
        "bytes_per_model": (dirs["base"] / "model.safetensors").stat().st_size,
    }
    try:
        written = []
        for _ in range(rounds):
            shutil.rmtree(merged)
            with PeakMemory(device) as memory:
                started = time.perf_counter()
                merge_to_directory(plan, merged, model_dirs=dirs, device=device)
                merged_at = time.perf_counter()
                engine.load_weights(merged)
                done = time.perf_counter()
            written.append(
                {
                    "merge": merged_at - started,
                    "load": done - merged_at,
                    "ready": done - started,
                    "peak_gib": memory.above_entry_gib,
                }
            )
            print("written", json.dumps(written[-1]), flush=True)
        resident = []
        for round_ in range(rounds + 1):  # the first reads the experts into memory: reported apart
            with PeakMemory(device) as memory:
                started = time.perf_counter()
                placed = engine.load_merge(plan, dirs, device=device, limit_bytes=None)
                done = time.perf_counter()
            resident.append(
                {
                    "merge": placed["merge_seconds"],  # computing the merged tensors
                    "load": placed["load_seconds"],  # vLLM's load_weights and post-load processing
                    "ready": done - started,
                    "peak_gib": memory.above_entry_gib,
                    "where": placed["where"],
                    "reason": placed["reason"],
                }
            )
            print("resident", round_, json.dumps(resident[-1]), flush=True)
        report["written"] = {k: round(statistics.median(r[k] for r in written), 3) for k in written[0]}
        report["resident_first"] = resident[0]
        report["resident"] = {
            k: round(statistics.median(r[k] for r in resident[1:]), 3) for k in ("merge", "load", "ready", "peak_gib")
        }
        report["resident_over_written"] = round(report["resident"]["ready"] / report["written"]["ready"], 3)
        report["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2)
    finally:
        engine.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["smollm2", "smollm2_hf", "llama1b"]
    parser.add_argument("--part", nargs="+", default=parts, choices=parts)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--results", default="bench/results/resident_merge.json")
    args = parser.parse_args()
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    for part, backend in (("smollm2", "vllm"), ("smollm2_hf", "hf")):
        if part in args.part:
            results[part] = smollm2(args.rounds, args.samples, backend)
            path.write_text(json.dumps(results, indent=2))
    if "llama1b" in args.part:
        results["llama1b"] = llama1b(args.rounds)
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
