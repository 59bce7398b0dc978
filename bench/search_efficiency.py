"""Real searches per strategy: the incumbent's held-out score against evaluated samples, over seeds.

In a world of search_world.WORLDS - the tiny-model world (base, three experts, three tasks; WORLD there) or
the SmolLM2-135M chat world of bench.real_llm_search (vLLM, 20 -> 180 samples per task) - for several
seeds, four searches run with the same budget of evaluated samples (budget.maxSamples): LFS with TPE under
Hyperband (every bracket), under ASHA (`fidelity.brackets: 1`), with every trial at max samples (full
fidelity), and random search at max samples. Each is a real `mergesearch run` (local executor, real merges,
real evaluations), stopped where its final stage would begin: the benchmark scores every plan that was
ever the incumbent (best at the top rung so far), and the initial design, on the held-out split itself,
with one kept engine. Bench.search_bound replays many more draw orders over a measured pool; these are the
searches it cannot replay (TPE's own proposals).

Reported per strategy, over the seeds every chosen strategy has finished: the mean anytime curve of the
incumbent's held-out score against evaluated samples with its standard error; where it first reaches
full fidelity's final mean, as a share of the budget; the final held-out score against full fidelity's,
paired by seed; and the initial design's held-out scores.

    python -m bench.search_efficiency [--world tiny|smollm2] [--seeds 0 1 ... 9] [--full-trials 24]
        [--strategies hyperband asha full-fidelity random] [--summarize-only]

Finished searches are kept in the results file and not run again (delete it to start over).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from bench.search_world import (
    CURVE_POINTS,
    FULL_FIDELITY,
    STRATEGIES,
    WORLDS,
    PlanScorer,
    SearchWorld,
    curve_for_json,
    draw_curves,
    mean_accuracy,
    mean_curve,
    paired_difference,
    reach,
    step_curve,
)
from mergesearch_operator.local import LocalSearch
from mergesearch_operator.search.controller import SearchController, SearchStatus, result_key
from mergesearch_operator.search.phases import Phase
from mergesearch_operator.spaces.baselines import baselines
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
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
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
    # Each finished search is saved at once and skipped when the benchmark is run again: a tiny-world seed
    # takes about 4 minutes on 2 cores, a SmolLM2 search about 15, and seeds can be added one at a time.
    runs: dict[str, dict[int, Any]] = {s: {} for s in STRATEGIES}
    if results.exists() and (saved := json.loads(results.read_text())).get("budget_samples") == budget:
        runs |= {s: {int(seed): run for seed, run in by_seed.items()} for s, by_seed in saved["runs"].items()}
    if not args.summarize_only:
        run_searches(world, runs, args.strategies, args.seeds, budget, work, results)
    # summarized: the chosen strategies over the seeds that every one of them has finished
    seeds = sorted(seed for seed in runs[FULL_FIDELITY] if all(seed in runs[s] for s in args.strategies))
    if FULL_FIDELITY not in args.strategies or len(seeds) < 2:
        raise SystemExit(f"{results}: the summary compares with {FULL_FIDELITY}, over at least 2 seeds")
    summary = summarize(runs, args.strategies, seeds, budget, full_trial=budget // args.full_trials)
    save(results, runs, budget, summary)
    plot(summary, Path(args.plot or results.with_suffix(".png")))
    print(json.dumps({k: v for k, v in summary.items() if k != "grid_full_trials"}, indent=1))


def save(results: Path, runs: dict[str, dict[int, Any]], budget: int, summary: dict[str, Any] | None = None) -> None:
    results.parent.mkdir(parents=True, exist_ok=True)
    data = {"budget_samples": budget, "summary": summary, "runs": runs}
    results.write_text(json.dumps(data, indent=1, default=str))


def search_until_final(search: LocalSearch) -> tuple[SearchStatus, SearchController]:
    """Run a search until its final stage, and stop it there. The benchmark scores every incumbent and
    the baselines on the held-out split itself, with one kept engine (HeldOut); the product's final stage
    would start a run per baseline for the same numbers, about 6 minutes per SmolLM2 search."""
    controller = search.controller()
    try:
        while not (status := controller.reconcile()).phase.finished and status.phase is not Phase.FINALIZING:
            time.sleep(0.5)
    finally:
        controller.executor.close()
    if status.phase is Phase.FAILED:
        raise RuntimeError(f"{search.name}: {status.message}")
    return status, controller


def run_searches(
    world: SearchWorld,
    runs: dict[str, dict[int, Any]],
    strategies: list[str],
    seeds: list[int],
    budget: int,
    work: Path,
    results: Path,
) -> None:
    with contextlib.ExitStack() as closing:
        held_out: HeldOut | None = None  # opened for the first search: every search has the same models
        for seed in seeds:
            for strategy in strategies:
                if seed in runs[strategy]:
                    continue
                name = f"{strategy}-{seed}"
                resource = parse_manifest(world.manifest(name, seed, STRATEGIES[strategy], budget))
                if held_out is None:
                    held_out = HeldOut(resource)
                    closing.enter_context(held_out.scorer)
                # A fresh study: an old one left in the work directory would be resumed, and being finished,
                # would hand back its old results for what is meant to be a new run.
                shutil.rmtree(work / name, ignore_errors=True)
                started = time.monotonic()
                status, controller = search_until_final(LocalSearch.for_manifest(resource, work_dir=work / name))
                seconds = round(time.monotonic() - started, 1)
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
                    "final_held_out": {
                        "best": history[-1][3],
                        **{label: held_out(plan) for label, plan in baselines(controller.facts).items()},
                    },
                }
                save(results, runs, budget)
                print(name, seconds, "s", history[-1] if history else None, flush=True)


def summarize(
    runs: dict[str, dict[int, Any]], strategies: list[str], seeds: list[int], budget: int, full_trial: int
) -> dict[str, Any]:
    """Per strategy, over seeds: the mean anytime curve of the incumbent's held-out score against evaluated
    samples with its standard error, where it first reaches full fidelity's final mean (as a share of the
    budget), and the final held-out score against full fidelity's, paired by seed."""
    # Runs in flight when the budget ran out finish past it: the grid runs to the last incumbent found.
    end = max([budget] + [runs[s][seed]["history"][-1][0] for s in strategies for seed in seeds])
    grid = np.linspace(end / CURVE_POINTS, end, CURVE_POINTS)
    curves = {
        s: np.array(
            [
                step_curve(np.array([h[0] for h in history]), np.array([h[3] for h in history]), grid)
                for history in (runs[s][seed]["history"] for seed in seeds)
            ]
        )
        for s in strategies
    }
    final_ff = curves[FULL_FIDELITY][:, -1]
    target = float(np.mean(final_ff))
    summary: dict[str, Any] = {"budget_samples": budget, "seeds": seeds, "full_fidelity_final_mean": target}
    summary["strategies"] = {}
    for strategy, values in curves.items():
        mean, se = mean_curve(values)
        difference, difference_se = paired_difference(values[:, -1], final_ff)
        summary["strategies"][strategy] = {
            "final_mean": float(mean[-1]),
            "final_minus_full_fidelity": difference,
            "paired_standard_error": difference_se,
            "reach_ratio_samples": reach(mean, grid, budget, target),
            "final_search_score_mean": statistics.mean(runs[strategy][seed]["history"][-1][2] for seed in seeds),
            "candidates_mean": statistics.mean(
                runs[strategy][seed]["trials"]["completed"] + runs[strategy][seed]["trials"]["pruned"] for seed in seeds
            ),
            "seconds_mean": statistics.mean(runs[strategy][seed]["seconds"] for seed in seeds),
            "curve_samples": curve_for_json(mean),
            "curve_standard_error": curve_for_json(se),
        }
    summary["grid_full_trials"] = [round(float(g) / full_trial, 3) for g in grid]
    fixed = runs[FULL_FIDELITY][seeds[0]]["final_held_out"]  # the same plans in every run
    summary["baselines_held_out"] = {label: value for label, value in fixed.items() if label != "best"}
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    """The mean held-out curves against evaluated samples, with a band of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    draw_curves(axis, summary["grid_full_trials"], summary["strategies"])
    axis.set_title(f"real searches, {len(summary['seeds'])} seeds")
    axis.set_xlabel("evaluated samples, in full-fidelity trials")
    axis.set_ylabel("held-out accuracy of the incumbent")
    axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
