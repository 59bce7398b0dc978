"""How many evaluated samples a search needs: multi-fidelity against full fidelity and random search.

On a tiny-model world (base, three experts, three tasks; see WORLD in search_world.py), for several seeds, four
searches run with the same budget of evaluated samples (budget.maxSamples): the LFS search with
Hyperband (min -> max samples, eta 3), the same with Hyperband's most aggressive bracket only (ASHA),
the same search with every trial at max samples, and random search at max samples.
Each search is a real `mergesearch run` (local executor, real merges, real evaluations). Afterwards
every plan that was ever the incumbent (best at the top rung so far) is evaluated on the held-out test
split, giving "best held-out score versus samples used" per search, and the samples each search needed
to first reach the full-fidelity search's final best: on the held-out split, and on the search score
at full fidelity (what the searches optimise; every incumbent's score is on all maxSamples samples).
Also reported: the final best of each search against each expert alone, uniform task arithmetic and
TIES on the held-out split.

    python -m bench.search_efficiency [--seeds 0 1 ... 9] [--full-trials 24] [--summarize-only]

Finished searches are kept in the results file and not run again (delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import optuna

from bench.search_world import (
    MAX_SAMPLES,
    STRATEGIES,
    TASKS,
    WORLD,
    first_reaching,
    manifest,
    standard_error,
)
from mergesearch_operator.local import LocalSearch
from mergesearch_operator.search.controller import result_key
from mergesearch_operator.spec import parse_manifest
from mergesearch_trial_runner.cli import run_trial
from mergesearch_trial_runner.spec import TrialSpec
from mergesearch_trial_runner.testbed.models import build_world

BASELINE_LABELS = [f"expert:{t}" for t in TASKS] + ["task_arithmetic", "ties"]


def incumbents(study: optuna.Study, top_rung: int) -> list[tuple[int, int, float]]:
    """(samples used when it became the incumbent, trial number, search score) in time order."""
    events = []  # (time, samples of this result, trial, score or None)
    for trial in study.trials:
        for rung in range(top_rung + 1):
            result = trial.user_attrs.get(result_key(rung))
            if result is None:
                continue
            evaluated = sum(e for _, e in result["tasks"].values())
            at_top = rung == top_rung and trial.state == optuna.trial.TrialState.COMPLETE
            events.append((result["at"], evaluated, trial.number, trial.value if at_top else None))
    events.sort()
    used, best, history = 0, float("-inf"), []
    for _, evaluated, number, value in events:
        used += evaluated
        if value is not None and value > best:
            best = value
            history.append((used, number, value))
    return history


def held_out(plan, spec, name: str, cache: dict[str, float], work: Path) -> float:
    key = plan.to_json()
    if key not in cache:
        trial = TrialSpec(
            name=name,
            plan=plan,
            tasks=[o.task() for o in spec.objectives],
            split="test",
            backend="hf",
            engine_args={"device": "cpu"},
            cache_dir=str(work / "cache"),
            scratch_dir=str(work / "scratch"),
        )
        result = run_trial(trial)
        cache[key] = statistics.mean(c.correct / c.evaluated for c in result.tasks.values())
    return cache[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--full-trials", type=int, default=24, help="the sample budget, in full-fidelity trials")
    parser.add_argument("--work-dir", default=".cache/bench/search")
    parser.add_argument("--results", default="bench/results/search_efficiency.json")
    parser.add_argument("--plot", default="bench/results/search_efficiency.png")
    parser.add_argument("--summarize-only", action="store_true", help="recompute summary and plot from --results")
    args = parser.parse_args()
    results = Path(args.results)
    budget = args.full_trials * MAX_SAMPLES * len(TASKS)
    # Each finished search is saved at once and skipped when the benchmark is run again: a seed takes
    # about 4 minutes on 2 cores, and seeds can be added one at a time.
    runs: dict[str, dict[int, Any]] = {s: {} for s in STRATEGIES}
    if results.exists() and (saved := json.loads(results.read_text())).get("budget_samples") == budget:
        runs |= {s: {int(seed): run for seed, run in by_seed.items()} for s, by_seed in saved["runs"].items()}
    if not args.summarize_only:
        run_searches(runs, args.seeds, budget, Path(args.work_dir).absolute(), results)
    seeds = sorted(seed for seed in runs["full-fidelity"] if all(seed in runs[s] for s in STRATEGIES))
    if not seeds:
        raise SystemExit(f"{results}: no seed has all of {list(STRATEGIES)} yet")
    summary = summarize(runs, seeds, budget)
    save(results, runs, budget, summary)
    plot(runs, seeds, budget, Path(args.plot))
    print(json.dumps(summary, indent=2))


def save(results: Path, runs: dict[str, dict[int, Any]], budget: int, summary: dict[str, Any] | None = None) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    data = {"budget_samples": budget, "summary": summary, "runs": runs}
    results.write_text(json.dumps(data, indent=1, default=str))


def run_searches(runs: dict[str, dict[int, Any]], seeds: list[int], budget: int, work: Path, results: Path) -> None:
    world = build_world(Path.home() / ".cache" / "mergesearch", WORLD)
    cache: dict[str, float] = {}
    for seed in seeds:
        for strategy, settings in STRATEGIES.items():
            if seed in runs[strategy]:
                continue
            name = f"{strategy}-{seed}"
            resource = parse_manifest(manifest(world, name, seed, settings, budget))
            # A fresh study: an old one left in the work directory would be resumed, and being finished,
            # would hand back its old results for what is meant to be a new run.
            shutil.rmtree(work / name, ignore_errors=True)
            search = LocalSearch.for_manifest(resource, work_dir=work / name)
            started = time.monotonic()
            status = search.run(lambda _status: None)
            controller = search.inspect()
            study = controller.study
            history = [
                (
                    used,
                    number,
                    value,
                    held_out(
                        controller.space.plan_of(study.trials[number].params),
                        resource.spec,
                        f"{name}-t{number}",
                        cache,
                        work,
                    ),
                )
                for used, number, value in incumbents(study, controller.schedule.top_rung)
            ]
            runs[strategy][seed] = {
                "seconds": round(time.monotonic() - started, 1),
                "samples_used": status.samples_used,
                "trials": status.trials,
                "history": history,
                "final_held_out": {label: statistics.mean(v.values()) for label, v in status.final.items()},
            }
            save(results, runs, budget)
            print(name, runs[strategy][seed]["seconds"], "s", history[-1] if history else None, flush=True)


# What each score is measured on: all tasks' test splits, or every task's first maxSamples search samples.
METRICS = {"held_out": (3, len(TASKS) * WORLD.test_samples), "search_score": (2, len(TASKS) * MAX_SAMPLES)}


def summarize(runs: dict[str, dict[int, Any]], seeds: list[int], budget: int) -> dict[str, Any]:
    """Per seed, the samples each search needed to reach the full-fidelity search's final best, on the
    held-out split and on the search score at full fidelity (every incumbent's score is at maxSamples):
    exactly, and to within one standard error of it (scores that close are not told apart by the data,
    so "reaching" an exact value partly measures luck)."""
    summary: dict[str, Any] = {"budget_samples": budget, "seeds": seeds, "per_seed": {}}
    criteria = ("exact", "within_one_se")
    ratios = {(s, m, c): [] for s in STRATEGIES for m in METRICS for c in criteria}
    for seed in seeds:
        full = runs["full-fidelity"][seed]["history"]
        row: dict[str, Any] = {}
        for metric, (index, samples) in METRICS.items():
            target = full[-1][index]  # full fidelity's final incumbent, chosen by its search score
            se = standard_error(target, samples)
            row[metric] = {"target": target, "standard_error": se}
            for criterion, threshold in zip(criteria, (target, target - se), strict=True):
                full_needed = first_reaching(full, threshold, index)
                row[metric][criterion] = {}
                for strategy in STRATEGIES:
                    history = runs[strategy][seed]["history"]
                    needed = first_reaching(history, threshold, index)
                    row[metric][criterion][strategy] = needed
                    if needed is not None:
                        ratios[strategy, metric, criterion].append(needed / full_needed)
            row[metric]["final_best"] = {s: runs[s][seed]["history"][-1][index] for s in STRATEGIES}
        summary["per_seed"][seed] = row
    summary["mean_ratio_of_samples_to_reach_full_fidelity_best"] = {
        f"{metric}/{criterion}": {
            s: (
                statistics.mean(ratios[s, metric, criterion])
                if len(ratios[s, metric, criterion]) == len(seeds)
                else None
            )
            for s in STRATEGIES
        }
        for metric in METRICS
        for criterion in criteria
    }
    summary["seeds_reaching_the_target"] = {
        f"{metric}/{criterion}": {s: len(ratios[s, metric, criterion]) for s in STRATEGIES}
        for metric in METRICS
        for criterion in criteria
    }
    fixed = runs["full-fidelity"][seeds[0]]["final_held_out"]  # the same plans in every run
    summary["held_out_comparison"] = {
        # each search's final incumbent (chosen by its search score, never by the held-out split)
        **{s: statistics.mean(runs[s][seed]["history"][-1][3] for seed in seeds) for s in STRATEGIES},
        **{label: value for label, value in fixed.items() if label in BASELINE_LABELS},
    }
    return summary


def plot(runs, seeds, budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(seeds))
    rows = math.ceil(len(seeds) / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), sharey=True, squeeze=False)
    axes = list(grid.flat)
    for axis in axes[len(seeds) :]:
        axis.set_visible(False)
    for axis, seed in zip(axes, seeds, strict=False):
        for strategy, color in zip(STRATEGIES, ("tab:blue", "tab:green", "tab:orange", "tab:gray"), strict=True):
            history = runs[strategy][seed]["history"]
            xs = [used for used, *_ in history]
            xs.append(max([budget, *xs]))  # the runs in flight when the budget ran out finish past it
            ys = [score for *_, score in history] + ([history[-1][3]] if history else [])
            axis.step(xs, ys, where="post", label=strategy, color=color)
        axis.set_title(f"seed {seed}")
        axis.set_xlabel("samples evaluated")
    for row in grid:
        row[0].set_ylabel("held-out accuracy of the incumbent")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
