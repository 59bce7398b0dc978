"""The same TIES merge through MergeSearch's engine and through mergekit 0.1.5, side by side.

Models: SmolLM2-135M-Instruct (the real architecture and size: 30 layers, 49k vocabulary, tied
embeddings, bf16) as the base, and three synthetic "experts" made by adding small seeded noise to every
tensor (a fine-tune's task vector is small next to its weights; its content does not change the cost).
Both tools merge the one recipe (TIES of the three experts onto the base, density 0.5, bf16), each in a
fresh process, alternating, several rounds. Wall time and peak RSS (from wait4's rusage of that child)
are reported as medians and ratios; the outputs are compared as a sanity check.

    make bench-merge        # or: python -m bench.merge_vs_mergekit --mergekit-python .venv-mergekit/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.experts import make_experts

RECIPE = """\
models:
  - model: {root}/base
  - model: {root}/expert1
    parameters: {{weight: 0.4, density: 0.5}}
  - model: {root}/expert2
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {root}/expert3
    parameters: {{weight: 0.3, density: 0.5}}
merge_method: ties
base_model: {root}/base
dtype: bfloat16
"""


def timed(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[0]} failed: {process.stderr.read().decode() if process.stderr else ''}")
    return elapsed, usage.ru_maxrss * 1024


def load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in model_dir.glob("*.safetensors"):
        state.update(load_file(file))
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-python", required=True, help="python of an environment with mergekit 0.1.5")
    parser.add_argument("--work-dir", default=".cache/bench/merge")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", default="bench/results/merge_vs_mergekit.json")
    args = parser.parse_args()

    root = Path(args.work_dir).resolve()
    make_experts(root)
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=root))
    mergekit_yaml = str(Path(args.mergekit_python).parent / "mergekit-yaml")
    tools = {
        "mergesearch": lambda out: [sys.executable, "-m", "mergesearch_operator.cli", "merge", str(recipe), str(out)],
        "mergekit": lambda out: [mergekit_yaml, str(recipe), str(out), "--quiet"],
    }
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in tools}
    for round_index in range(args.rounds):
        order = list(tools) if round_index % 2 == 0 else list(reversed(tools))
        for name in order:
            out = root / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            wall, peak = timed(tools[name](out))
            samples[name].append((wall, peak))
            print(f"round {round_index + 1} {name:11s} {wall:6.1f}s {peak / 2**20:7.0f} MiB")

    ours, theirs = load_all(root / "out-mergesearch"), load_all(root / "out-mergekit")
    max_diff = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in theirs)
    summary = {
        name: {
            "wall_s": statistics.median(s[0] for s in runs),
            "peak_rss_mib": statistics.median(s[1] for s in runs) / 2**20,
        }
        for name, runs in samples.items()
    }
    ratios = {
        "wall": summary["mergesearch"]["wall_s"] / summary["mergekit"]["wall_s"],
        "peak_rss": summary["mergesearch"]["peak_rss_mib"] / summary["mergekit"]["peak_rss_mib"],
    }
    result = {
        "merge": "TIES, 3 experts onto SmolLM2-135M (bf16), density 0.5",
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "tools": summary,
        "ratios_mergesearch_over_mergekit": ratios,
        "max_abs_difference": max_diff,
        "same_tensor_names": set(ours) == set(theirs),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
