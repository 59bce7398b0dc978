"""What lm-eval's own work costs a trial: an lm_eval objective against the backend's generation time.

Model: SmolLM2-135M-Instruct (bf16), the vllm backend on CPU, one engine for the whole run (as a kept
engine serves a local search). Task: lm-eval's built-in `gsm8k` config (its prompt, 5-shot context from
`fewShotData`, regex filters, exact match) over GSM8K-format arithmetic documents written here. For each
rung's range (the lowest rung first: 20 documents) a trial's evaluation is timed whole, and the time
spent inside the backend's primitives (greedy generation, log-likelihoods) apart; lm-eval's overhead is
the rest (building requests and few-shot contexts, the dataset in memory, filters, metrics). Beside it,
the same questions zero-shot as a plain JSONL objective through MergeSearch's own prompt path, for its
overhead share. Also reported apart: the first lm_eval evaluation in a process (importing lm-eval and indexing
its built-in tasks, once per trial process). Medians of `--repeats` calls after a warm-up.

    python -m bench.lm_eval_overhead [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mergesearch_trial_runner.evaluate.registry import open_evaluator
from mergesearch_trial_runner.tasks import TaskSpec, parse_samples, read_local_text
from mergesearch_trial_runner.testbed.smollm2 import export_smollm2

RUNGS = (20, 60)  # the lowest rungs of the default schedule, where a fixed cost weighs most
RESULTS = Path("bench/results/lm_eval_overhead.json")


def documents(count: int) -> list[dict[str, Any]]:
    pairs = [(3 + 7 * i % 89, 11 + 13 * i % 71) for i in range(count)]
    return [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a, b in pairs]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Timed:
    """Wraps an evaluator's two primitives to add up the seconds spent in them."""

    def __init__(self, evaluator: Any) -> None:
        self.seconds = 0.0
        for name in ("_generate", "_loglikelihoods"):
            setattr(evaluator, name, self._timed(getattr(evaluator, name)))

    def _timed(self, call: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = export_smollm2(Path.home() / ".cache" / "mergesearch" / "smollm2-135m-instruct-bf16")
    root = Path(tempfile.mkdtemp(prefix="lm-eval-overhead-"))
    rows = documents(max(RUNGS))
    lm_task = TaskSpec(
        name="gsm8k",
        kind="lm_eval",
        lm_eval_task="gsm8k",
        data=write_jsonl(root / "test.jsonl", rows),
        few_shot_data=write_jsonl(root / "train.jsonl", documents(200)[-20:]),
    )
    plain = TaskSpec(  # the same questions zero-shot, through MergeSearch's own prompt path: its overhead
        name="plain", data="unused", max_new_tokens=256, stop=["Question:", "</s>", "<|im_end|>"],
        answer_pattern=r"#### (\-?[0-9\.\,]+)",
    )  # fmt: skip
    docs = parse_samples(read_local_text(lm_task.data), kind="lm_eval", source=lm_task.data)
    report: dict[str, Any] = {"model": "SmolLM2-135M-Instruct bf16", "backend": "vllm (CPU)", "rungs": {}}
    with open_evaluator("vllm", model=model) as evaluator:
        timed = Timed(evaluator)
        started = time.perf_counter()
        evaluator.evaluate(task=lm_task, samples=docs[:2])
        report["first_lm_eval_call_seconds"] = time.perf_counter() - started
        for rung in RUNGS:
            lm_runs, plain_runs = [], []
            for _ in range(args.repeats):
                timed.seconds = 0.0
                started = time.perf_counter()
                evaluator.evaluate(task=lm_task, samples=docs[:rung])
                total = time.perf_counter() - started
                lm_runs.append({"total": total, "backend": timed.seconds, "overhead": total - timed.seconds})
            samples = parse_samples(
                "".join(json.dumps({"prompt": _prompt(d.doc), "answer": "0"}) + "\n" for d in docs[:rung]),
                kind="generate",
                source="plain",
            )
            for _ in range(args.repeats):
                timed.seconds = 0.0
                started = time.perf_counter()
                evaluator.evaluate(task=plain, samples=samples)
                total = time.perf_counter() - started
                plain_runs.append({"total": total, "backend": timed.seconds, "overhead": total - timed.seconds})
            median = {
                side: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                for side, runs in (("lm_eval", lm_runs), ("jsonl", plain_runs))
            }
            median["lm_eval"]["overhead_share"] = median["lm_eval"]["overhead"] / median["lm_eval"]["total"]
            median["jsonl"]["overhead_share"] = median["jsonl"]["overhead"] / median["jsonl"]["total"]
            report["rungs"][str(rung)] = median
            print(rung, json.dumps(median), flush=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def _prompt(document: Any) -> str:
    return f"Question: {document['question']}\nAnswer:"


if __name__ == "__main__":
    main()
