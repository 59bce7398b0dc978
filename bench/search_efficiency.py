"""How many evaluated samples a search needs: multi-fidelity against full fidelity and random search.

In a world of search_world.WORLDS - the tiny-model world (base, three experts, three tasks; WORLD there) or
the SmolLM2-135M chat world of bench.real_llm_search (vLLM, 20 -> 180 samples per task) - for several seeds, four
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

    python -m bench.search_efficiency [--world tiny|smollm2] [--seeds 0 1 ... 9] [--full-trials 24] [--summarize-only]

Finished searches are kept in the results file and not run again (delete it to start over).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import optuna

from bench.search_world import (
    STRATEGIES,
    WORLDS,
    PlanScorer,
    SearchWorld,
    first_reaching,
    mean_accuracy,
    standard_error,
)
from mergesearch_operator.local import LocalSearch
from mergesearch_operator.search.controller import result_key
from mergesearch_operator.spec import parse_manifest
from mergesearch_trial_runner.store import ModelStore
from mergesearch_trial_runner.tasks import load_splits


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


class HeldOut:
    """Held-out scores of plans, each measured once, by one scorer (for vLLM: one kept engine)."""

    def __init__(self, resource) -> None:
        self.tasks = [o.task() for o in resource.spec.objectives]
        self.samples = {t.name: (t, load_splits(t)["test"]) for t in self.tasks}
        base = ModelStore().fetch_model(resource.spec.models.base)
        self.scorer = PlanScorer(resource.spec.trial.backend, resource.spec.trial.engine_args, base)
        self.cache: dict[str, float] = {}

    def __call__(self, plan) -> float:
        key = plan.to_json()
        if key not in self.cache:
            bits, _ = self.scorer.score(plan, self.samples)
            self.cache[key] = mean_accuracy(bits)
        return self.cache[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--full-trials", type=int, default=24, help="the sample budget, in full-fidelity trials")
    parser.add_argument("--work-dir", default=None, help="default: .cache/bench/search (tiny), -<world> else")
    parser.add_argument("--results", default=None, help="default: bench/results/search_efficiency[_<world>].json")
    parser.add_argument("--plot", default=None, help="default: the results file's name, .png")
    parser.add_argument("--summarize-only", action="store_true", help="recompute summary and plot from --results")
    args = parser.parse_args()
    world = WORLDS[args.world]
    suffix = "" if world.name == "tiny" else f"_{world.name}"
    results = Path(args.results or f"bench/results/search_efficiency{suffix}.json")
    work = Path(args.work_dir or f".cache/bench/search{suffix.replace('_', '-')}").absolute()
    budget = args.full_trials * world.max_samples * len(world.tasks)
    # Each finished search is saved at once and skipped when the benchmark is run again: a seed takes
    # about 4 minutes on 2 cores, and seeds can be added one at a time.
    runs: dict[str, dict[int, Any]] = {s: {} for s in STRATEGIES}
    if results.exists() and (saved := json.loads(results.read_text())).get("budget_samples") == budget:
        runs |= {s: {int(seed): run for seed, run in by_seed.items()} for s, by_seed in saved["runs"].items()}
    if not args.summarize_only:
        run_searches(world, runs, args.seeds, budget, work, results)
    seeds = sorted(seed for seed in runs["full-fidelity"] if all(seed in runs[s] for s in STRATEGIES))
    if not seeds:
        raise SystemExit(f"{results}: no seed has all of {list(STRATEGIES)} yet")
    summary = summarize(world, runs, seeds, budget)
    save(results, runs, budget, summary)
    plot(runs, seeds, budget, Path(args.plot or results.with_suffix(".png")))
    print(json.dumps(summary, indent=2))


def save(results: Path, runs: dict[str, dict[int, Any]], budget: int, summary: dict[str, Any] | None = None) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    data = {"budget_samples": budget, "summary": summary, "runs": runs}
    results.write_text(json.dumps(data, indent=1, default=str))


def run_searches(
    world: SearchWorld, runs: dict[str, dict[int, Any]], seeds: list[int], budget: int, work: Path, results: Path
) -> None:
    with contextlib.ExitStack() as closing:
        held_out: HeldOut | None = None  # opened for the first search: every search has the same models
        for seed in seeds:
            for strategy, settings in STRATEGIES.items():
                if seed in runs[strategy]:
                    continue
                name = f"{strategy}-{seed}"
                resource = parse_manifest(world.manifest(name, seed, settings, budget))
                if held_out is None:
                    held_out = HeldOut(resource)
                    closing.enter_context(held_out.scorer)
                # A fresh study: an old one left in the work directory would be resumed, and being finished,
                # would hand back its old results for what is meant to be a new run.
                shutil.rmtree(work / name, ignore_errors=True)
                search = LocalSearch.for_manifest(resource, work_dir=work / name)
                started = time.monotonic()
                status = search.run(lambda _status: None)
                seconds = round(time.monotonic() - started, 1)
                controller = search.inspect()
                plan_of = controller.space.plan_of
                history = [
                    (used, number, value, held_out(plan_of(controller.study.trials[number].params)))
                    for used, number, value in incumbents(controller.study, controller.schedule.top_rung)
                ]
                runs[strategy][seed] = {
                    "seconds": seconds,
                    "samples_used": status.samples_used,
                    "trials": status.trials,
                    "history": history,
                    "final_held_out": {label: statistics.mean(v.values()) for label, v in status.final.items()},
                }
                save(results, runs, budget)
                print(name, seconds, "s", history[-1] if history else None, flush=True)


def summarize(world: SearchWorld, runs: dict[str, dict[int, Any]], seeds: list[int], budget: int) -> dict[str, Any]:
    """Per seed, the samples each search needed to reach the full-fidelity search's final best, on the
    held-out split and on the search score at full fidelity (every incumbent's score is at maxSamples):
    exactly, and to within one standard error of it (scores that close are not told apart by the data,
    so "reaching" an exact value partly measures luck)."""
    # What each score is measured on: all tasks' test splits, or every task's first maxSamples search samples.
    metrics = {
        "held_out": (3, len(world.tasks) * world.test_samples),
        "search_score": (2, len(world.tasks) * world.max_samples),
    }
    summary: dict[str, Any] = {"budget_samples": budget, "seeds": seeds, "per_seed": {}}
    criteria = ("exact", "within_one_se")
    ratios = {(s, m, c): [] for s in STRATEGIES for m in metrics for c in criteria}
    for seed in seeds:
        full = runs["full-fidelity"][seed]["history"]
        row: dict[str, Any] = {}
        for metric, (index, samples) in metrics.items():
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
        for metric in metrics
        for criterion in criteria
    }
    summary["seeds_reaching_the_target"] = {
        f"{metric}/{criterion}": {s: len(ratios[s, metric, criterion]) for s in STRATEGIES}
        for metric in metrics
        for criterion in criteria
    }
    fixed = runs["full-fidelity"][seeds[0]]["final_held_out"]  # the same plans in every run
    summary["held_out_comparison"] = {
        # each search's final incumbent (chosen by its search score, never by the held-out split)
        **{s: statistics.mean(runs[s][seed]["history"][-1][3] for seed in seeds) for s in STRATEGIES},
        **{label: value for label, value in fixed.items() if label != "best"},
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
