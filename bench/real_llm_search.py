"""Does the search pay on a real LLM? Searches on the SmolLM2-135M world against the hand recipes.

The world (`mergesearch testbed --world smollm2`): SmolLM2-135M-Instruct and three experts, each fully
fine-tuned on one chat task with exact answers (reverse words, sort numbers, add two numbers). Each
search is a user's first manifest: the space's defaults (LFS: 4 layer groups, five methods, self_attn /
mlp / rest; or DIS), the vLLM backend, the default schedule over 20 -> 180 samples per task (the
results on record ran Hyperband, the default then; it is ASHA now). Its final stage scores the best
merge, each expert alone and every hand recipe on the held-out split (300 samples per task); the base is
scored once beside them. Each finished search is saved at once and skipped when the
benchmark runs again, so seeds and spaces can be added one at a time.

    python -m bench.real_llm_search [--space LFS|DIS] [--seeds 0 1 2] [--trials 60] [--scale-range LOW HIGH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from mergesearch_operator.local import LocalSearch
from mergesearch_operator.spaces.baselines import expert_alone, is_baseline
from mergesearch_operator.spec import parse_manifest
from mergesearch_trial_runner.cli import run_trial
from mergesearch_trial_runner.spec import TrialSpec
from mergesearch_trial_runner.testbed.chat_world import ChatWorldSettings, build_chat_world

WORLD = ChatWorldSettings()
TRIAL = {"backend": "vllm", "timeoutSeconds": 1800}
FIDELITY = {"minSamples": 20, "maxSamples": 180, "reductionFactor": 3}  # three rungs: 20, 60, 180 per task


def manifest(
    world, name: str, space: str, seed: int, trials: int, scale_range: list[float] | None = None
) -> dict[str, Any]:
    search_space: dict[str, Any] = {"type": space}  # the defaults, as a user's first manifest has them
    if scale_range:
        search_space["scaleRange"] = scale_range
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name},
        "spec": {
            "models": world.manifest_models(),
            "searchSpace": search_space,
            "objectives": world.manifest_objectives(chatTemplate=True, maxNewTokens=WORLD.max_new_tokens),
            "fidelity": dict(FIDELITY),
            "budget": {"maxTrials": trials, "parallelTrials": 2},
            "search": {"seed": seed},
            "trial": TRIAL,
        },
    }


def mean_accuracy(scores: dict[str, float]) -> float:
    return statistics.mean(scores.values())


def base_scores(world, resource, work: Path) -> dict[str, float]:
    """The base alone on the held-out split, through the same trial runner as the final stage."""
    from mergesearch_operator.spaces import ModelFacts

    facts = ModelFacts(
        model_uris={"base": str(world.model("base")), **{e: str(world.model(e)) for e in world.experts}},
        experts=tuple(world.experts),
        num_layers=30,
    )
    spec = TrialSpec(
        name="base",
        plan=expert_alone(facts, "base"),
        tasks=[o.task() for o in resource.spec.objectives],
        split="test",
        backend=TRIAL["backend"],
        cache_dir=str(work / "cache"),
        scratch_dir=str(work / "scratch"),
    )
    result = run_trial(spec)
    return {task: counts.correct / counts.evaluated for task, counts in result.tasks.items()}


def _label(run: dict[str, Any]) -> str:
    """A space and, where the run set one, its DIS scale range: runs are summarised per label."""
    scale = run.get("scale_range")
    return f"{run['space']} scale {scale[0]:g}-{scale[1]:g}" if scale else run["space"]


def summarize(runs: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for space in sorted({_label(run) for run in runs.values()}):
        chosen = [run for run in runs.values() if _label(run) == space]
        margins: dict[str, list[float]] = {"over best recipe": [], "over best expert": []}
        for run in chosen:
            final = {label: mean_accuracy(scores) for label, scores in run["final"].items()}
            best = final["best"]
            recipes = [v for label, v in final.items() if is_baseline(label) and not label.startswith("expert:")]
            experts = [v for label, v in final.items() if label.startswith("expert:")]
            margins["over best recipe"].append(best - max(recipes))
            margins["over best expert"].append(best - max(experts))
        summary[space] = {
            "seeds": [run["seed"] for run in chosen],
            **{
                name: {
                    "mean": statistics.mean(values),
                    "se": statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None,
                    "per seed": values,
                }
                for name, values in margins.items()
            },
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=("LFS", "DIS"), default="LFS")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--scale-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="DIS only")
    parser.add_argument("--work-dir", default=".cache/bench/real-llm")
    parser.add_argument("--results", default="bench/results/real_llm_search.json")
    args = parser.parse_args()
    work, results = Path(args.work_dir).absolute(), Path(args.results)
    saved = json.loads(results.read_text()) if results.exists() else {}
    runs: dict[str, Any] = saved.get("runs", {})
    world = build_chat_world(Path.home() / ".cache" / "mergesearch", WORLD)
    for seed in args.seeds:
        name = f"{args.space.lower()}-{seed}-{args.trials}"
        if args.scale_range:
            name += "-scale-{:.0f}-{:.0f}".format(*(100 * bound for bound in args.scale_range))  # in percent
        if name in runs:
            continue
        resource = parse_manifest(manifest(world, name, args.space, seed, args.trials, args.scale_range))
        shutil.rmtree(work / name, ignore_errors=True)  # a finished study left there would be resumed
        search = LocalSearch.for_manifest(resource, work_dir=work / name)
        started = time.monotonic()
        status = search.run(lambda _status: None)
        controller = search.inspect()
        best_trial = status.best.trial if status.best else None
        runs[name] = {
            "space": args.space,
            "scale_range": args.scale_range,
            "seed": seed,
            "trials": args.trials,
            "minutes": (time.monotonic() - started) / 60,
            "samples": status.samples_used,
            "counts": status.trials,
            "final": status.final,
            "best_plan": controller.space.plan_of(controller.study.trials[best_trial].params).model_dump(mode="json")
            if best_trial is not None
            else None,
        }
        if "base" not in saved:
            saved["base"] = base_scores(world, resource, work / "base")
        saved |= {"world": WORLD.key(), "runs": runs, "summary": summarize(runs)}
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(saved, indent=1))
        print(json.dumps({name: runs[name]["final"], "summary": saved["summary"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
