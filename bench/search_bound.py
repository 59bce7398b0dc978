"""What multi-fidelity saves, by replay over measured merges: anytime curves, budgets to reach, rung quality.

Real searches cost tens of minutes each on the SmolLM2 world; this carries the many seeds and the large
budgets. It measures a pool of merges once, keeping every sample's correctness: the space's initial
design (each expert alone and the hand recipes, which every real search runs first) and then plans drawn
at random from the space, each on all maxSamples search samples per task in fidelity order (a rung of n
samples per task is the first n, as a trial sees them), and on the whole held-out split wherever a plan
can matter for a curve (the initial design, and every plan that is ever an incumbent in a replay).

It then replays searches over the pool, one trial at a time, under the product's own `Schedule` and
`promotable`: the initial design first, then random draws (TPE cannot be replayed over a fixed pool: a
real search's TPE proposes plans the pool does not hold). Each draw order is run by every strategy -
full fidelity, Hyperband, its most aggressive brackets down to ASHA (`fidelity.brackets: 1`, the
default), and two references no real schedule reaches: ASHA with oracle rungs (every rung ranks a plan
by its score on all maxSamples samples: no noise), and a clairvoyant search that pays one lowest rung for
each plan it draws and the rest of maxSamples only for a plan that is the best so far on all of them - so
strategies are compared on the same draws, as paired differences. A trial's device-seconds are the
plan's measured merge-and-load time for each run it makes plus its measured seconds per sample.

Reported per sample budget (in full-fidelity trials): each strategy's mean held-out curve of its
incumbent against evaluated samples and device-seconds, with its standard error over draw orders; where
its mean curve first reaches full fidelity's final mean, as a ratio to the budget; and its final held-out
score against full fidelity's, paired over draw orders. Per trial budget (`budget.maxTrials`, the initial
design included): the final held-out score against full fidelity's, paired, and the samples and
device-seconds spent as shares of full fidelity's. Also, how well each rung ranks the pool's random plans
(Spearman correlation with the top rung; share of the top 10 kept by successive halving).

    python -m bench.search_bound --world smollm2 [--candidates 200] [--full-trials 24 48 96]
        [--max-trials 30 60 120] [--replays 300]
    python -m bench.search_bound --world tiny [--candidates 300]

The pool is kept in the work directory and extended, not redrawn, when --candidates grows; an
interrupted measurement keeps every plan it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from scipy.stats import spearmanr

from bench.search_world import (
    CURVE_POINTS,
    FULL_FIDELITY,
    STRATEGIES,
    WORLDS,
    PlanScorer,
    curve_for_json,
    draw_curves,
    mean_accuracy,
    mean_curve,
    paired_difference,
    reach,
    step_curve,
)
from mergesearch_operator.local import LocalSearch
from mergesearch_operator.search.hyperband import Schedule, promotable
from mergesearch_operator.spaces.base import SearchSpace
from mergesearch_operator.spec import MergeSearch, parse_manifest
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.store import ModelStore
from mergesearch_trial_runner.tasks import Sample, TaskSpec, load_splits, sample_range

RUNGS, ORACLE, CLAIRVOYANT = "rungs", "oracle", "clairvoyant"
REFERENCES = ("asha, oracle rungs", CLAIRVOYANT)  # not schedules a search can run
TOP_PLANS = 10  # the rung-quality report follows the pool's best 10 plans through successive halving
SHARED_MACHINE = 1.25  # a per-sample time this far above the pool's median was measured beside other work
ONE_OFF = 4.0  # a merge-and-load time this far above the median paid an engine's one-off costs


def world_manifest(world_name: str) -> dict[str, Any]:
    """A search manifest over the world (its space, objectives, fidelity and trial backend are what count)."""
    return WORLDS[world_name].manifest("search-bound", 0, STRATEGIES["random"], 1)


def strategies(resource: MergeSearch) -> dict[str, tuple[Schedule, str]]:
    """Name -> (schedule, how rungs rank: `RUNGS` on their own samples, `ORACLE` on all maxSamples, or
    `CLAIRVOYANT`) over the manifest's fidelity."""
    f = resource.spec.fidelity
    hyperband = Schedule.build(f.min_samples, f.max_samples, f.reduction_factor)
    return {
        FULL_FIDELITY: (Schedule.single_fidelity(f.max_samples), RUNGS),
        "hyperband": (hyperband, RUNGS),
        **{
            f"brackets {n}": (Schedule.build(f.min_samples, f.max_samples, f.reduction_factor, n), RUNGS)
            for n in range(hyperband.rungs - 1, 1, -1)
        },
        "asha": (Schedule.build(f.min_samples, f.max_samples, f.reduction_factor, 1), RUNGS),
        "asha, oracle rungs": (Schedule.build(f.min_samples, f.max_samples, f.reduction_factor, 1), ORACLE),
        CLAIRVOYANT: (Schedule.build(f.min_samples, f.max_samples, f.reduction_factor, 1), CLAIRVOYANT),
    }


@dataclass
class Pool:
    """The measured plans: the initial design first, then random draws; kept as JSON lines."""

    path: Path
    resource: MergeSearch
    space: SearchSpace
    entries: list[dict[str, Any]]

    @classmethod
    def open(cls, world_name: str, work: Path) -> Pool:
        work.mkdir(parents=True, exist_ok=True)
        resource = parse_manifest(world_manifest(world_name))
        shutil.rmtree(work / "study", ignore_errors=True)  # only the space is wanted, not an old study
        space = LocalSearch.for_manifest(resource, work_dir=work / "study").controller().space
        path = work / "pool.jsonl"
        entries = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return cls(path, resource, space, entries)

    @property
    def tasks(self) -> list[TaskSpec]:
        return [objective.task() for objective in self.resource.spec.objectives]

    def _samples(self, split: str) -> dict[str, tuple[TaskSpec, list[Sample]]]:
        top = self.resource.spec.fidelity.max_samples
        chosen = {}
        for task in self.tasks:
            samples = load_splits(task)[split]
            chosen[task.name] = (task, sample_range(samples, 0, top, task=task.name) if split == "search" else samples)
        return chosen

    def _save(self) -> None:
        self.path.write_text("".join(json.dumps(e) + "\n" for e in self.entries))

    def scorer(self) -> PlanScorer:
        base = ModelStore().fetch_model(self.space.facts.model_uris["base"])
        return PlanScorer(self.resource.spec.trial.backend, self.resource.spec.trial.engine_args, base)

    def measure(self, candidates: int, scorer: PlanScorer) -> None:
        """Extend the pool to the initial design plus `candidates` random plans; the initial design gets its
        held-out scores at once (every replay runs it)."""
        initial = self.space.initial_params()
        # Drawn in the same seeded order every time, so that a larger pool extends a smaller one.
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        wanted: list[tuple[str, dict[str, Any]]] = [("initial", p) for p in initial]
        for _ in range(candidates):
            trial = study.ask()
            self.space.suggest(trial)
            study.tell(trial, 0.0)
            wanted.append(("random", trial.params))
        search = self._samples("search")
        for index in range(len(self.entries), len(wanted)):
            kind, params = wanted[index]
            plan = self.space.plan_of(params)
            assert isinstance(plan, MergePlan), "LFS plans are never skipped"
            bits, seconds = scorer.score(plan, search)
            self.entries.append({"kind": kind, "params": params, "search": bits, "seconds": seconds, "test": None})
            self._save()
            print(
                f"plan {index} ({kind}): {seconds['load']:.1f} s load, {seconds['per_sample'] * 1e3:.0f} ms/sample",
                flush=True,
            )
        self.measure_held_out({i for i, entry in enumerate(self.entries) if entry["kind"] == "initial"}, scorer)

    def measure_held_out(self, indices: set[int], scorer: PlanScorer) -> None:
        test = self._samples("test")
        for index in sorted(i for i in indices if self.entries[i]["test"] is None):
            plan = self.space.plan_of(self.entries[index]["params"])
            assert isinstance(plan, MergePlan)
            self.entries[index]["test"], _ = scorer.score(plan, test)
            self._save()
            print(f"plan {index}: held-out measured", flush=True)


class Replay:
    """Searches over a measured pool, one trial at a time: the initial design, then random draws."""

    def __init__(self, pool: Pool, candidates: int):
        entries = pool.entries
        self.initial = [i for i, e in enumerate(entries) if e["kind"] == "initial"]
        self.random = [i for i, e in enumerate(entries) if e["kind"] == "random"][:candidates]
        self.tasks = len(pool.tasks)
        self.top = pool.resource.spec.fidelity.max_samples
        correct = np.array([[[bit == "1" for bit in task] for task in e["search"]] for e in entries], dtype=float)
        # running[p, n]: plan p's mean accuracy over the tasks on their first n samples
        counts = np.concatenate([np.zeros((*correct.shape[:2], 1)), correct.cumsum(axis=2)], axis=2)
        self.running = (counts / np.maximum(np.arange(counts.shape[2]), 1)).mean(axis=1)
        self.full = self.running[:, self.top]
        self.load_seconds = np.array([e["seconds"]["load"] for e in entries])
        self.sample_seconds = np.array([e["seconds"]["per_sample"] for e in entries])
        # A plan measured while something else ran on the machine shows a slow per-sample time, and the
        # first merges of an engine pay its one-off costs (its start, reading the experts in, TIES's sort
        # of magnitudes); they are charged the pool's median seconds instead (correctness is unaffected).
        self.shared = (self.sample_seconds > SHARED_MACHINE * np.median(self.sample_seconds)) | (
            self.load_seconds > ONE_OFF * np.median(self.load_seconds)
        )
        self.load_seconds[self.shared] = np.median(self.load_seconds[~self.shared])
        self.sample_seconds[self.shared] = np.median(self.sample_seconds[~self.shared])
        self.held_out = np.array([np.nan if e["test"] is None else mean_accuracy(e["test"]) for e in entries])

    def order(self, rng: random.Random, length: int) -> list[int]:
        return self.initial + [rng.choice(self.random) for _ in range(length)]

    def incumbents(
        self, order: list[int], schedule: Schedule, ranking: str, budget: float, salt: str
    ) -> tuple[list[tuple[int, float, int]], int, float]:
        """(samples used, device-seconds used, plan) each time a plan finished at the top rung with the best
        score so far, until `budget` samples are used or `order` has run out; and the samples and
        device-seconds used by then."""
        arrivals: dict[tuple[int, int], list[float]] = {}  # (bracket, rung) -> scores that reached it
        used, seconds, best, history = 0, 0.0, float("-inf"), []
        for number, plan in enumerate(order):
            if ranking == CLAIRVOYANT:  # the lowest rung, and the rest only for a new best
                lowest = schedule.budgets[0]
                runs = [lowest] + ([schedule.budgets[-1] - lowest] if self.full[plan] > best else [])
                used += sum(runs) * self.tasks
                seconds += sum(self.load_seconds[plan] + self.sample_seconds[plan] * n * self.tasks for n in runs)
                if len(runs) > 1:
                    best = self.full[plan]
                    history.append((used, seconds, plan))
                if used >= budget:
                    return history, used, seconds
                continue
            bracket = schedule.bracket_of(number, salt)
            for rung in range(bracket, schedule.rungs):
                start, end = schedule.sample_range(rung, bracket)
                used += (end - start) * self.tasks
                seconds += self.load_seconds[plan] + self.sample_seconds[plan] * (end - start) * self.tasks
                score = self.full[plan] if ranking == ORACLE else self.running[plan, end]
                arrivals.setdefault((bracket, rung), []).append(score)
                if rung == schedule.top_rung:
                    if score > best:
                        best = score
                        history.append((used, seconds, plan))
                elif not promotable(score, arrivals[bracket, rung], schedule.reduction_factor):
                    break
            if used >= budget:
                break
        return history, used, seconds

    def curve(self, history: list[tuple[int, float, int]], grid: np.ndarray, axis: int) -> np.ndarray:
        """The incumbent's held-out score at each point of `grid` (axis 0: samples, 1: device-seconds)."""
        plans = np.array([entry[2] for entry in history], dtype=int)
        return step_curve(np.array([entry[axis] for entry in history]), self.held_out[plans], grid)

    def rung_quality(self, schedule: Schedule) -> list[dict[str, float]]:
        """Per rung below the top, over the random plans: Spearman correlation of rung scores with top-rung
        scores, and the share of the top plans (by top-rung score) that successive halving keeps."""
        plans = np.array(self.random)
        top = set(plans[np.argsort(-self.full[plans])[:TOP_PLANS]].tolist())
        kept, report = plans, []
        for rung in range(schedule.top_rung):
            samples = schedule.budgets[rung]
            scores = self.running[kept, samples]
            kept = kept[np.argsort(-scores, kind="stable")[: max(1, len(kept) // schedule.reduction_factor)]]
            report.append(
                {
                    "samples_per_task": samples,
                    "spearman_with_top_rung": float(spearmanr(self.running[plans, samples], self.full[plans])[0]),
                    f"top_{TOP_PLANS}_kept": len(top & set(kept.tolist())) / TOP_PLANS,
                }
            )
        return report


def replay_budget(
    replay: Replay, schedules: dict[str, tuple[Schedule, str]], trials: int, replays: int, rng: random.Random
) -> dict[str, Any]:
    """Every strategy over the same `replays` draw orders, with a budget of `trials` full-fidelity trials."""
    full_trial = replay.top * replay.tasks
    budget = trials * full_trial
    histories: dict[str, list] = {name: [] for name in schedules}
    seconds: dict[str, list[float]] = {name: [] for name in schedules}
    for index in range(replays):
        order = replay.order(rng, trials * 40)
        for name, (schedule, ranking) in schedules.items():
            history, used, spent = replay.incumbents(order, schedule, ranking, budget, salt=str(index))
            if used < budget:
                raise ValueError("the draw order ran out before the budget; draw more")
            histories[name].append(history)
            seconds[name].append(spent)
    return {"budget_samples": budget, "full_trial": full_trial, "histories": histories, "seconds": seconds}


def replay_trial_budget(
    replay: Replay, schedules: dict[str, tuple[Schedule, str]], trials: int, replays: int, rng: random.Random
) -> dict[str, dict[str, np.ndarray]]:
    """Every schedule a search can run, over the same `replays` draw orders of `trials` trials (the initial
    design included), as `budget.maxTrials` bounds a search: per schedule, each order's final incumbent and
    the samples and device-seconds spent."""
    names = [name for name in schedules if name not in REFERENCES]
    run = {name: {"final": np.zeros(replays, dtype=int), "spent": np.zeros((replays, 2))} for name in names}
    for index in range(replays):
        order = replay.order(rng, trials - len(replay.initial))
        for name in names:
            schedule, ranking = schedules[name]
            history, used, seconds = replay.incumbents(order, schedule, ranking, math.inf, salt=str(index))
            run[name]["final"][index] = history[-1][2]
            run[name]["spent"][index] = used, seconds
    return run


def summarize_trial_budget(replay: Replay, run: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """The final held-out score against full fidelity's, paired, and the samples and device-seconds spent
    as shares of full fidelity's."""
    reference = run[FULL_FIDELITY]
    summary = {}
    for name, outcome in run.items():
        difference, difference_se = paired_difference(
            replay.held_out[outcome["final"]], replay.held_out[reference["final"]]
        )
        summary[name] = {
            "final_mean": float(replay.held_out[outcome["final"]].mean()),
            "final_minus_full_fidelity": difference,
            "paired_standard_error": difference_se,
            "samples_share": float(outcome["spent"][:, 0].mean() / reference["spent"][:, 0].mean()),
            "device_seconds_share": float(outcome["spent"][:, 1].mean() / reference["spent"][:, 1].mean()),
        }
    return summary


def summarize_budget(replay: Replay, run: dict[str, Any], points: int = CURVE_POINTS) -> dict[str, Any]:
    """Mean curves with standard errors, reach ratios and paired final differences for one budget."""
    budget, histories = run["budget_samples"], run["histories"]
    sample_grid = np.linspace(budget / points, budget, points)
    curves = {n: np.array([replay.curve(h, sample_grid, 0) for h in hs]) for n, hs in histories.items()}
    # device-seconds: multi-fidelity pays a merge and load per rung run, so at an equal sample budget it
    # spends more; the grid runs to the longest mean spend, ratios are to full fidelity's
    spent = statistics.mean(run["seconds"][FULL_FIDELITY])
    longest = max(statistics.mean(values) for values in run["seconds"].values())
    seconds_grid = np.linspace(longest / points, longest, points)
    seconds_curves = {n: np.array([replay.curve(h, seconds_grid, 1) for h in hs]) for n, hs in histories.items()}
    final_ff = curves[FULL_FIDELITY][:, -1]
    target = float(np.nanmean(final_ff))
    summary: dict[str, Any] = {"full_fidelity_final_mean": target, "strategies": {}}
    for name, values in curves.items():
        mean, se = mean_curve(values)
        seconds_mean, _ = mean_curve(seconds_curves[name])
        difference, difference_se = paired_difference(values[:, -1], final_ff)
        summary["strategies"][name] = {
            "device_seconds_spent": statistics.mean(run["seconds"][name]),
            "final_mean": float(mean[-1]),
            "final_minus_full_fidelity": difference,
            "paired_standard_error": difference_se,
            "reach_ratio_samples": reach(mean, sample_grid, budget, target),
            "reach_ratio_device_seconds": reach(seconds_mean, seconds_grid, spent, target),
            "curve_samples": curve_for_json(mean),
            "curve_standard_error": curve_for_json(se),
            "curve_device_seconds": curve_for_json(seconds_mean),
        }
    summary["grid_full_trials"] = [round(float(g) / run["full_trial"], 3) for g in sample_grid]
    summary["grid_device_seconds"] = [round(float(g), 1) for g in seconds_grid]
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    """Each budget's mean held-out curves against evaluated samples, with a band of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = summary["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), sharey=True, squeeze=False)
    for axis, (trials, budget) in zip(axes[0], budgets.items(), strict=True):
        draw_curves(axis, budget["grid_full_trials"], budget["strategies"], dotted=REFERENCES)
        axis.set_title(f"{trials} full-fidelity trials")
        axis.set_xlabel("evaluated samples, in full-fidelity trials")
    axes[0][0].set_ylabel("held-out accuracy of the incumbent")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--candidates", type=int, default=200, help="random plans in the pool")
    parser.add_argument("--full-trials", type=int, nargs="+", default=[24, 48, 96], help="budgets")
    parser.add_argument("--max-trials", type=int, nargs="+", default=[30, 60, 120], help="trial budgets")
    parser.add_argument("--replays", type=int, default=300, help="draw orders per budget")
    parser.add_argument("--work-dir", default=".cache/bench/search-bound")
    parser.add_argument("--results", default=None, help="default: bench/results/search_bound_<world>.json")
    args = parser.parse_args()
    pool = Pool.open(args.world, Path(args.work_dir).absolute() / args.world)
    schedules = strategies(pool.resource)
    with pool.scorer() as scorer:
        pool.measure(args.candidates, scorer)
        while True:  # every plan that is ever an incumbent needs its held-out score
            replay, rng = Replay(pool, args.candidates), random.Random(0)
            runs = {trials: replay_budget(replay, schedules, trials, args.replays, rng) for trials in args.full_trials}
            trial_runs = {
                trials: replay_trial_budget(replay, schedules, trials, args.replays, rng) for trials in args.max_trials
            }
            plans = {plan for run in runs.values() for hs in run["histories"].values() for h in hs for _, _, plan in h}
            plans |= {int(p) for run in trial_runs.values() for outcome in run.values() for p in outcome["final"]}
            missing = {plan for plan in plans if np.isnan(replay.held_out[plan])}
            if not missing:
                break
            pool.measure_held_out(missing, scorer)
    random_plans = np.array(replay.random)
    summary = {
        "world": args.world,
        "candidates": len(replay.random),
        "initial_design": len(replay.initial),
        "timings_replaced_by_the_median": int(replay.shared.sum()),
        "pool_search_scores": {
            "initial_best": float(replay.full[replay.initial].max()),
            "random_quantiles": [float(q) for q in np.quantile(replay.full[random_plans], [0, 0.5, 0.9, 1])],
        },
        "rung_quality": replay.rung_quality(schedules["asha"][0]),
        "budgets": {trials: summarize_budget(replay, run) for trials, run in runs.items()},
        "trial_budgets": {trials: summarize_trial_budget(replay, run) for trials, run in trial_runs.items()},
    }
    results = Path(args.results or f"bench/results/search_bound_{args.world}.json")
    results.write_text(json.dumps(summary, indent=1))
    plot(summary, results.with_suffix(".png"))
    for trials, budget in summary["budgets"].items():
        print(f"{trials} full-fidelity trials: full fidelity ends at {budget['full_fidelity_final_mean']:.3f}")
        for name, s in budget["strategies"].items():
            print(
                f"  {name:20s} final {s['final_mean']:.3f}  vs FF {s['final_minus_full_fidelity']:+.4f}"
                f" ± {s['paired_standard_error']:.4f}  reach {s['reach_ratio_samples']}"
                f" (seconds {s['reach_ratio_device_seconds']})"
            )
    for trials, by_name in summary["trial_budgets"].items():
        print(f"{trials} trials (budget.maxTrials):")
        for name, s in by_name.items():
            print(
                f"  {name:20s} final {s['final_mean']:.3f}  vs FF {s['final_minus_full_fidelity']:+.4f}"
                f" ± {s['paired_standard_error']:.4f}  samples {s['samples_share']:.2f}"
                f"  seconds {s['device_seconds_share']:.2f}"
            )


if __name__ == "__main__":
    main()
