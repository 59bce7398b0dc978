"""What any multi-fidelity schedule could save in the search benchmark's world: replays over measured merges.

`search_efficiency.py` measures real searches; this measures the world they run in. It draws a pool of
merge plans at random from that benchmark's LFS space, evaluates each on all maxSamples search samples
per task (hf backend, in memory), and keeps every sample's correctness in fidelity order: a rung of n
samples per task is the first n of them, as a trial sees them. It then replays random search over the
pool (many random draw orders) under the product's own schedules (`Schedule`, `promotable`): full
fidelity, Hyperband, ASHA, and ASHA with an oracle lowest rung, whose rungs rank each plan by its score
on all maxSamples samples (a rung with no noise at all, which no real schedule has). For each sample
budget it reports the samples each needed to reach full fidelity's final best (to within one standard
error, as the search benchmark counts it) as a ratio to full fidelity's, beside a lower bound for any
schedule over these rungs that looks at every plan it draws: one lowest rung for each plan drawn before
the first that reaches the target, plus that plan's full evaluation.

The replay runs one trial at a time, so every promotion decision sees every earlier result (the real
searches run 2 in parallel), and it draws at random (the real searches use TPE after the initial design).
Also reported: the spread of the pool's scores, and how often the lowest rung's top 1/eta keeps the best
plan of a rung's worth of plans.

    python -m bench.search_bound [--candidates 300] [--full-trials 24 48 96] [--replays 300]

The pool is kept in the work directory and extended, not redrawn, when --candidates grows.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import optuna

from bench.search_world import (
    ETA,
    MAX_SAMPLES,
    MIN_SAMPLES,
    STRATEGIES,
    TASKS,
    WORLD,
    first_reaching,
    manifest,
    standard_error,
)
from mergesearch_operator.local import LocalSearch
from mergesearch_operator.search.hyperband import Schedule, promotable
from mergesearch_operator.spec import parse_manifest
from mergesearch_trial_runner.evaluate import InMemoryModel, open_evaluator
from mergesearch_trial_runner.merge.engine import merge_to_state_dict
from mergesearch_trial_runner.store import ModelStore
from mergesearch_trial_runner.tasks import load_splits, sample_range
from mergesearch_trial_runner.testbed.models import build_world

SCHEDULES = {
    "full-fidelity": (Schedule.single_fidelity(MAX_SAMPLES), False),
    "hyperband": (Schedule.build(MIN_SAMPLES, MAX_SAMPLES, ETA), False),
    "asha": (Schedule.build(MIN_SAMPLES, MAX_SAMPLES, ETA, max_brackets=1), False),
    "asha, oracle rungs": (Schedule.build(MIN_SAMPLES, MAX_SAMPLES, ETA, max_brackets=1), True),
}
IDEAL = "lower bound, any schedule"


def measure_pool(size: int, work: Path) -> np.ndarray:
    """Correctness (plan, task, sample) of `size` random plans on each task's first maxSamples search samples."""
    path = work / "pool.json"
    pool = json.loads(path.read_text()) if path.exists() else []
    if len(pool) < size:
        world = build_world(Path.home() / ".cache" / "mergesearch", WORLD)
        resource = parse_manifest(manifest(world, "search-bound", 0, STRATEGIES["random"], 1))
        space = LocalSearch.for_manifest(resource, work_dir=work / "study").controller().space
        tasks = [objective.task() for objective in resource.spec.objectives]
        samples = {t.name: sample_range(load_splits(t)["search"], 0, MAX_SAMPLES, task=t.name) for t in tasks}
        store = ModelStore()
        # Draw in the same seeded order every time, so that a larger pool extends a smaller one.
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        for index in range(size):
            trial = study.ask()
            plan = space.suggest(trial)
            study.tell(trial, 0.0)
            if index < len(pool):
                continue
            started = time.monotonic()
            model_dirs = {name: store.fetch_model(uri) for name, uri in plan.models.items()}
            with open_evaluator("hf", model=InMemoryModel(*merge_to_state_dict(plan, model_dirs=model_dirs))) as model:
                pool.append(
                    [
                        "".join(
                            "1" if r.correct else "0" for r in model.evaluate_samples(task=t, samples=samples[t.name])
                        )
                        for t in tasks
                    ]
                )
            path.write_text(json.dumps(pool))
            print(f"plan {index}: {time.monotonic() - started:.1f} s", flush=True)
    return np.array([[[bit == "1" for bit in task] for task in plan] for plan in pool[:size]], dtype=float)


class Replay:
    """Random search over a measured pool under one schedule, one trial at a time."""

    def __init__(self, correct: np.ndarray):
        # running[p, n]: plan p's mean accuracy over the tasks on their first n samples
        counts = np.concatenate([np.zeros((*correct.shape[:2], 1)), correct.cumsum(axis=2)], axis=2)
        self.running = (counts / np.maximum(np.arange(counts.shape[2]), 1)).mean(axis=1)
        self.full = self.running[:, MAX_SAMPLES]

    def incumbents(self, order: list[int], schedule: Schedule, oracle: bool, budget: int) -> list[tuple[int, float]]:
        """(samples used, score) each time a plan finished at the top rung with the best score so far."""
        arrivals: dict[tuple[int, int], list[float]] = {}  # (bracket, rung) -> scores that reached it
        used, best, history = 0, float("-inf"), []
        for number, plan in enumerate(order):
            bracket = schedule.bracket_of(number)
            for rung in range(bracket, schedule.rungs):
                start, end = schedule.sample_range(rung, bracket)
                used += (end - start) * len(TASKS)
                score = self.full[plan] if oracle else self.running[plan, end]
                arrivals.setdefault((bracket, rung), []).append(score)
                if rung == schedule.top_rung:
                    if score > best:
                        best = score
                        history.append((used, best))
                elif not promotable(score, arrivals[bracket, rung], schedule.reduction_factor):
                    break
            if used >= budget:
                return history
        raise ValueError("the draw order ran out before the budget; draw more")

    def lowest_rung_keeps_best(self, rng: random.Random, pools: int) -> float:
        """Share of random rung-sized groups of plans whose best (on all samples) is in the lowest rung's top 1/eta."""
        group = ETA ** SCHEDULES["asha"][0].top_rung
        kept = 0
        for _ in range(pools):
            plans = rng.sample(range(len(self.full)), group)
            best = max(plans, key=lambda p: self.full[p])
            rung_scores = [self.running[p, MIN_SAMPLES] for p in plans]
            kept += promotable(self.running[best, MIN_SAMPLES], rung_scores, ETA)
        return kept / pools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=300)
    parser.add_argument(
        "--full-trials", type=int, nargs="+", default=[24, 48, 96], help="budgets, in full-fidelity trials"
    )
    parser.add_argument("--replays", type=int, default=300, help="random draw orders per budget")
    parser.add_argument("--work-dir", default=".cache/bench/search-bound")
    parser.add_argument("--results", default="bench/results/search_bound.json")
    args = parser.parse_args()
    replay = Replay(measure_pool(args.candidates, Path(args.work_dir).absolute()))
    rng = random.Random(0)
    full_trial = MAX_SAMPLES * len(TASKS)  # samples in one full-fidelity trial
    full, se = replay.full, standard_error(float(replay.full.max()), full_trial)
    summary: dict = {
        "candidates": len(full),
        "score_range": [float(full.min()), float(full.max())],
        "share_within_one_se_of_best": float((full >= full.max() - se).mean()),
        "lowest_rung_keeps_best": replay.lowest_rung_keeps_best(rng, 2000),
        "budgets": {},
    }
    for trials in args.full_trials:
        ratios: dict[str, list[float]] = {name: [] for name in [*SCHEDULES, IDEAL] if name != "full-fidelity"}
        full_needed = []
        for _ in range(args.replays):
            order = [rng.randrange(len(full)) for _ in range(trials * 40)]
            history = {
                name: replay.incumbents(order, s, oracle, trials * full_trial)
                for name, (s, oracle) in SCHEDULES.items()
            }
            final = history["full-fidelity"][-1][1]
            target = final - standard_error(final, full_trial)
            needed = {name: first_reaching(h, target, 1) for name, h in history.items()}
            full_needed.append(needed["full-fidelity"] / full_trial)
            for name in SCHEDULES.keys() - {"full-fidelity"}:
                ratios[name].append(needed[name] / needed["full-fidelity"] if needed[name] else float("inf"))
            # A schedule that looks at every plan it draws pays at least one lowest rung for each plan
            # drawn before the first that reaches the target, plus that plan's full evaluation.
            drawn = needed["full-fidelity"] // full_trial
            ratios[IDEAL].append(((drawn - 1) * MIN_SAMPLES * len(TASKS) + full_trial) / needed["full-fidelity"])
        summary["budgets"][trials] = {
            "full_fidelity_trials_to_target": {
                "mean": statistics.mean(full_needed),
                "median": statistics.median(full_needed),
            },
            **{
                name: {
                    "reached": sum(r != float("inf") for r in values) / len(values),
                    # over the replays that got there (None if none did); the median counts the others as worst
                    "mean_ratio": statistics.mean(reached)
                    if (reached := [r for r in values if r != float("inf")])
                    else None,
                    "median_ratio": statistics.median(values),
                }
                for name, values in ratios.items()
            },
        }
    Path(args.results).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
