"""Evaluate in a fresh process: one model, one backend, several (task, split, range) evaluations.

    python -m mergesearch_trial_runner.evaluate JOB.json OUT.json

A job is `{"backend": "vllm", "model": DIR, "settings": {...}, "evaluations": [{"task": {TaskSpec},
"split": "search", "start": 0, "end": 100, "details": false}, ...]}`; the result is `{"backend",
"device", "load_seconds", "evaluations": [{"counts": {correct, evaluated, generated_tokens},
"seconds", "samples": [per-sample results when details]}]}`, written as JSON to OUT (not stdout,
where vLLM logs).

A separate process keeps what a vLLM engine does to its caller (environment, threads, worker
processes) away from the caller: tests and benchmarks use it to run vLLM beside other work.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..tasks import Split, TaskSpec, load_splits, sample_range
from .registry import open_evaluator


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: TaskSpec
    split: Split = "search"
    start: int = Field(default=0, ge=0)
    end: int | None = Field(default=None, ge=0, description="default: the split's end")
    details: bool = False


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["hf", "vllm"]
    model: str
    settings: dict[str, Any] = Field(default_factory=dict)
    evaluations: list[Evaluation]


def run_job(job: Job) -> dict[str, Any]:
    started = time.perf_counter()
    evaluator = open_evaluator(job.backend, model=Path(job.model), settings=job.settings)
    report: dict[str, Any] = {
        "backend": job.backend,
        "device": getattr(evaluator, "device", None) and str(evaluator.device),
        "load_seconds": time.perf_counter() - started,
        "evaluations": [],
    }
    with evaluator:
        for evaluation in job.evaluations:
            samples = load_splits(evaluation.task)[evaluation.split]
            end = len(samples) if evaluation.end is None else evaluation.end
            chosen = sample_range(samples, evaluation.start, end, task=evaluation.task.name)
            began = time.perf_counter()
            results = evaluator.evaluate_samples(task=evaluation.task, samples=chosen)
            seconds = time.perf_counter() - began
            counts = {
                "correct": sum(r.correct for r in results),
                "evaluated": len(results),
                "generated_tokens": sum(r.generated_tokens for r in results),
            }
            entry: dict[str, Any] = {"counts": counts, "seconds": seconds}
            if evaluation.details:
                entry["samples"] = [dataclasses.asdict(r) for r in results]
            report["evaluations"].append(entry)
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report = run_job(Job.model_validate_json(Path(args[0]).read_text()))
    Path(args[1]).write_text(json.dumps(report))
    return 0
