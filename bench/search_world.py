"""The worlds the search benchmarks run in (the tiny-model world, the SmolLM2 chat world), the search
strategies, and the statistics that search_efficiency and search_bound share: anytime curves of the
incumbent's held-out score, their means over seeds (or draw orders), reach ratios and paired differences."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.real_llm_search import FIDELITY as CHAT_FIDELITY
from bench.real_llm_search import WORLD as CHAT_WORLD
from bench.real_llm_search import manifest as chat_manifest
from mergesearch_trial_runner.evaluate import InMemoryModel, open_evaluator
from mergesearch_trial_runner.evaluate.base import Evaluator
from mergesearch_trial_runner.merge.engine import merge_to_state_dict
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.store import ModelStore
from mergesearch_trial_runner.tasks import Sample, TaskSpec
from mergesearch_trial_runner.testbed.chat_world import build_chat_world
from mergesearch_trial_runner.testbed.models import WorldSettings, build_world

CACHE = Path.home() / ".cache" / "mergesearch"

TASKS = ("reverse", "sort", "shift")
# Not the tests' world. There every task uses the same letters, the experts forget the other tasks, and
# the mean score over tasks is flat along the merges that trade one task for another: uniform task
# arithmetic, in the initial design, is already as good as any merge out of sample, and no search
# strategy can be faster than another at finding it. Here each task has its own letters and each expert
# keeps seeing a fifth of the other tasks, so task vectors add up better and a searched merge can beat
# every merge of the initial design. The test split is larger, so that held-out scores are worth comparing.
WORLD = WorldSettings(task_letters=("abcdefgh", "ijklmnop", "qrstuvwx"), expert_replay=0.2, test_samples=500)
# A 27x range: four rungs (20, 60, 180, 540 samples per task). At 20 -> 180 (three rungs) multi-fidelity
# screened 1.8x as many candidates as full fidelity at the same budget, here 2.1x; the top rung's score
# has 0.58x the standard error (1/sqrt 3).
MIN_SAMPLES, MAX_SAMPLES, ETA = 20, 540, 3
FIDELITY = {"minSamples": MIN_SAMPLES, "maxSamples": MAX_SAMPLES, "reductionFactor": ETA}
FULL_FIDELITY = "full-fidelity"  # the strategy the others are compared with
CURVE_POINTS = 48  # grid points of the anytime curves
# Spec sections per strategy, merged into each world's manifest.
STRATEGIES = {
    "hyperband": {"search": {"sampler": "tpe", "multiFidelity": True}, "fidelity": {"brackets": None}},  # all
    "asha": {"search": {"sampler": "tpe", "multiFidelity": True}, "fidelity": {"brackets": 1}},  # the default
    FULL_FIDELITY: {"search": {"sampler": "tpe", "multiFidelity": False}},
    "random": {"search": {"sampler": "random", "multiFidelity": False}},
}


@dataclass(frozen=True)
class SearchWorld:
    """A world the search benchmarks run in, and its searches' manifest."""

    name: str
    tasks: tuple[str, ...]
    fidelity: dict[str, int]
    test_samples: int  # held-out samples per task

    @property
    def max_samples(self) -> int:
        return self.fidelity["maxSamples"]

    def manifest(self, name: str, seed: int, strategy: dict[str, Any], sample_budget: int) -> dict[str, Any]:
        """One search of `strategy` (sections of STRATEGIES) with `sample_budget` evaluated samples."""
        if self.name == "smollm2":
            # the real-LLM benchmark's search: LFS's defaults, vLLM, its fidelity
            document = chat_manifest(build_chat_world(CACHE, CHAT_WORLD), name, "LFS", seed, 1)
        else:
            document = _tiny_manifest(build_world(CACHE, WORLD), name)
        spec = document["spec"]
        spec["fidelity"] = dict(self.fidelity)
        spec["budget"] = {"maxTrials": 1000, "parallelTrials": 2, "maxSamples": sample_budget}
        for section, value in {"search": {"seed": seed}, **strategy}.items():
            spec[section] = {**spec.get(section, {}), **value}
        return document


def _tiny_manifest(world, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name},
        "spec": {
            "models": world.manifest_models(),
            "searchSpace": {
                "type": "LFS",
                "layerGroups": 2,
                # Weighted merges per layer group, one set of parameters for all of a group's tensors: in
                # this world good merges give every expert a weight near 0.6, which a space of five
                # methods with three tensor groups each (up to 30 parameters) hides from a 24-trial search.
                "methods": ["task_arithmetic", "ties"],
                "tensorGroups": [],
            },
            "objectives": world.manifest_objectives(TASKS, maxNewTokens=8),
            "trial": {"backend": "hf", "engineArgs": {"device": "cpu"}, "timeoutSeconds": 900},
        },
    }


WORLDS = {
    "tiny": SearchWorld("tiny", TASKS, FIDELITY, WORLD.test_samples),
    "smollm2": SearchWorld("smollm2", CHAT_WORLD.tasks, CHAT_FIDELITY, CHAT_WORLD.test_samples),
}


class PlanScorer(contextlib.AbstractContextManager):
    """Scores merge plans sample by sample: vLLM keeps one engine and merges each plan into it in place
    (as a kept trial engine does); hf merges each plan into memory and loads it afresh."""

    def __init__(self, backend: str, engine_args: dict[str, Any], base_dir: Path):
        self.backend, self.engine_args, self.base_dir = backend, engine_args, base_dir
        self.store = ModelStore()
        self._engine: Evaluator | None = None

    @contextlib.contextmanager
    def _loaded(self, plan: MergePlan) -> Iterator[Evaluator]:
        dirs = {name: self.store.fetch_model(uri) for name, uri in plan.models.items()}
        if self.backend == "vllm":
            assert self._engine is not None
            self._engine.load_merge(plan, dirs, device="cpu", limit_bytes=None)  # type: ignore[attr-defined]
            yield self._engine
        else:
            with open_evaluator(
                "hf", model=InMemoryModel(*merge_to_state_dict(plan, model_dirs=dirs)), settings=self.engine_args
            ) as model:
                yield model

    def score(self, plan: MergePlan, samples: dict[str, tuple[TaskSpec, list[Sample]]]) -> tuple[list[str], dict]:
        """Each task's correctness as a string of 0/1 in sample order, and the seconds it took (the merge and
        load once, the evaluation per sample; not the engine's start, which a kept engine pays once)."""
        if self.backend == "vllm" and self._engine is None:
            self._engine = open_evaluator("vllm", model=self.base_dir, settings=self.engine_args)
            with self._loaded(plan):  # the first merge also reads the experts in: a kept engine's one-off
                pass
        started = time.perf_counter()
        with self._loaded(plan) as model:
            loaded = time.perf_counter()
            bits = [
                "".join("1" if r.correct else "0" for r in model.evaluate_samples(task=task, samples=task_samples))
                for task, task_samples in samples.values()
            ]
        evaluated = sum(len(s) for _, s in samples.values())
        seconds = {"load": loaded - started, "per_sample": (time.perf_counter() - loaded) / evaluated}
        return bits, seconds

    def __exit__(self, *exc: object) -> None:
        if self._engine is not None:
            self._engine.close()


def mean_accuracy(bits: list[str]) -> float:
    """The mean over tasks of each task's accuracy, from its correctness string of 0/1 (`PlanScorer.score`)."""
    return math.fsum(task.count("1") / len(task) for task in bits) / len(bits)


def step_curve(used: np.ndarray, scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The incumbent's score at each point of `grid`: that of the last incumbent found with at most that
    much used (`used` ascending), NaN before the first."""
    at = np.searchsorted(used, grid, side="right") - 1
    return np.where(at >= 0, scores[np.maximum(at, 0)], np.nan) if len(used) else np.full(len(grid), np.nan)


def mean_curve(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over rows (seeds, draw orders) at each grid point; a row counts from its
    first incumbent on."""
    with warnings.catch_warnings():  # grid points before every row's first incumbent are all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(curves, axis=0)
        se = np.nanstd(curves, axis=0, ddof=1) / np.sqrt(np.sum(~np.isnan(curves), axis=0))
    return mean, se


def reach(mean: np.ndarray, grid: np.ndarray, total: float, target: float) -> float | None:
    """Where the mean curve first reaches `target`, as a share of `total`; None if it never does."""
    hits = np.nonzero(mean >= target - 1e-12)[0]
    return float(grid[hits[0]] / total) if hits.size else None


def curve_for_json(curve: np.ndarray) -> list[float | None]:
    """Rounded, with None (JSON null) where no incumbent was found yet."""
    return [None if np.isnan(x) else round(float(x), 4) for x in curve]


def draw_curves(axis: Any, grid: list[float], strategies: dict[str, dict[str, Any]], dotted=()) -> None:
    """Each strategy's mean curve (`curve_samples`) on `axis`, with a band of one standard error."""
    for name, strategy in strategies.items():
        mean = np.array(strategy["curve_samples"], dtype=float)  # None (no incumbent yet) becomes NaN
        se = np.array(strategy["curve_standard_error"], dtype=float)
        (line,) = axis.plot(grid, mean, label=name, linestyle=":" if name in dotted else "-")
        axis.fill_between(grid, mean - se, mean + se, color=line.get_color(), alpha=0.2)


def paired_difference(values: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean of values - reference, paired by row, and its standard error."""
    difference = np.asarray(values) - np.asarray(reference)
    return float(np.mean(difference)), float(np.std(difference, ddof=1) / np.sqrt(len(difference)))
