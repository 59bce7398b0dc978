"""Where one trial's time goes at the smallest fidelity, on SmolLM2-135M: fetch, merge, load, evaluate.

At low fidelity a trial's fixed cost (everything but evaluating samples) decides whether multi-fidelity
saves anything. One trial = TIES of three experts onto SmolLM2-135M-Instruct (as bench/merge_vs_mergekit
makes them), evaluated on 100 chat prompts with 64 new tokens, run the way each executor runs it:

- cold: a fresh `mergesearch-trial run` process, as a trial pod does (imports included);
- warm: a child of the local executor's fork server, which has imported what the backend's trials
  import and frozen that heap out of the garbage collector's reach, timed over the child's whole life
  (it exits right after its report, without closing its evaluator), with an engine of its own
  (`keep_engine: false`; hf: merged into memory, a model of its own), as `mergesearch run` ran it
  before the engine hosts;
- kept (`vllm` only): as `mergesearch run` runs it now: a child of a fork server whose engine host
  already runs an engine, into which the trial loads its merge in place (`keep_engine`, the default);
  the fork server's first run, which starts that engine, is timed apart ("first");
- worker: as a reused trial pod (`spec.trial.reusePods`) runs it: handed to a `mergesearch worker`
  process over HTTP and polled there, timed from the hand-over to the poll that sees it finished (the
  worker's own start, once for all its runs, is not in it; nor is the operator's reconcile interval,
  which a pod per run waits for just the same); its first run is timed apart too ("first");

for both backends: `hf` merges straight into memory, `vllm` writes the merge to a scratch directory on
local disk and evaluates it with an engine. Weights come from the node cache (already filled: the
cache's job is that a node downloads once). Reported: each phase's seconds and the fixed share of the
trial, medians over rounds in which the backends alternate and the modes take turns at going first.

    python -m bench.trial_breakdown [--samples 100] [--rounds 4]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.experts import make_experts
from mergesearch_operator.executors.base import RunPhase
from mergesearch_operator.executors.local import LocalExecutor
from mergesearch_operator.executors.worker import TOKEN_ENV, WorkerClient
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import TrialResult, TrialSpec

ENGINE = {"hf": {"device": "cpu", "batch_size": 64}, "vllm": {}}


def arithmetic_task(path: Path, count: int) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({"prompt": f"What is {a} plus {b}? Reply with the number only.", "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ties_plan(root: Path) -> MergePlan:
    return MergePlan.model_validate(
        {
            "models": {"base": str(root / "base"), **{f"e{i}": str(root / f"expert{i}") for i in (1, 2, 3)}},
            "base_model": "base",
            "slices": [
                {
                    "method": "ties",
                    "base": {"model": "base", "layers": [0, 30]},
                    "sources": [
                        {"model": f"e{i}", "layers": [0, 30], "params": {"weight": 0.4, "density": 0.5}}
                        for i in (1, 2, 3)
                    ],
                }
            ],
        }
    )


def run_cold(spec_file: Path) -> tuple[TrialResult, float]:
    """One run in a fresh `mergesearch-trial run` process, as a trial pod runs it, from start to exit."""
    started = time.perf_counter()
    cold = subprocess.run(
        [sys.executable, "-m", "mergesearch_trial_runner.cli", "run", str(spec_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    return TrialResult.model_validate_json(cold.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def run_forked(executor: LocalExecutor, spec: TrialSpec) -> tuple[TrialResult, float]:
    """One run through the local executor, forked by its fork server (preloaded for the spec's backend),
    and the child's whole life: from its start (its pid record) to its exit (the exit code the server
    writes when it reaps it), so that whatever the child does after its report counts too. The
    server's own start is not in it."""
    executor.start(spec)
    while (status := executor.poll(spec.name)).phase == RunPhase.RUNNING:
        time.sleep(0.2)
    run_dir = executor.runs_dir / spec.name
    while not (run_dir / "exit_code").exists():
        time.sleep(0.05)
    if status.result is None or not status.result.ok:
        raise SystemExit(f"the {spec.backend} run {spec.name} failed: {status.reason}")
    started = json.loads((run_dir / "pid").read_text())["started"]
    wall = (run_dir / "exit_code").stat().st_mtime - started
    executor.release(spec.name)
    return status.result, wall


def run_warm(spec: TrialSpec, work_dir: Path) -> tuple[TrialResult, float]:
    """One run as the first and only run of a new fork server, with an engine (hf: a model) of its own."""
    spec = spec.model_copy(update={"engine_args": {**spec.engine_args, "keep_engine": False}})
    executor = LocalExecutor(work_dir, timeout_seconds=600, cache_dir=Path(spec.cache_dir), backend=spec.backend)
    try:
        return run_forked(executor, spec)
    finally:
        executor.close()


def start_worker(backend: str, work_dir: Path, cache_dir: Path, port: int) -> tuple[subprocess.Popen, WorkerClient]:
    """A `mergesearch worker` on loopback, once it is ready (it has imported what the backend's trials do)."""
    token = secrets.token_urlsafe(16)
    command = [sys.executable, "-m", "mergesearch_operator.cli", "worker", "--backend", backend]
    options = {"--host": "127.0.0.1", "--port": port, "--work-dir": work_dir, "--cache-dir": cache_dir}
    process = subprocess.Popen(
        [*command, *(str(part) for option in options.items() for part in option), "--timeout-seconds", "600"],
        env={**os.environ, TOKEN_ENV: token},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if not process.stdout.readline().startswith("worker ready"):
        raise SystemExit(f"the {backend} worker did not start")
    return process, WorkerClient(f"127.0.0.1:{port}", token)


def run_on_worker(client: WorkerClient, spec: TrialSpec) -> tuple[TrialResult, float]:
    """One run handed to a worker, from the hand-over to the poll that sees it finished."""
    started = time.perf_counter()
    client.start(spec)
    while (status := client.poll(spec.name)).phase == RunPhase.RUNNING:
        # As often as the warm runs are polled. Polling at 20 Hz slowed the run itself on 2 cores (vLLM
        # merge 3.2-4.1 s against 2.5-3.1 s, 3 runs each); the operator polls once per reconcile.
        time.sleep(0.2)
    wall = time.perf_counter() - started
    client.release(spec.name)
    if status.result is None or not status.result.ok:
        raise SystemExit(f"the {spec.backend} run on the worker failed: {status.reason}")
    return status.result, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--work-dir", default=".cache/bench/merge")
    parser.add_argument("--results", default="bench/results/trial_breakdown.json")
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    # 4 rounds: each of vLLM's 4 modes goes first once.
    parser.add_argument("--rounds", type=int, default=4, help="each phase is reported as its median over rounds")
    args = parser.parse_args()

    root = Path(args.work_dir).absolute()
    make_experts(root)
    scratch = Path(tempfile.mkdtemp(prefix="ms-trial-"))
    task = {
        "name": "arith",
        "data": str(arithmetic_task(scratch / "arith.jsonl", args.samples * 2)),
        "test_fraction": 0.1,
        "chat_template": True,
        "max_new_tokens": 64,
        "answer_pattern": r"(-?\d+)\D*$",  # the last number: the model restates the sum first
    }

    def spec_for(backend: str, name: str) -> TrialSpec:
        return TrialSpec(
            name=name,
            plan=ties_plan(root),
            tasks=[task],
            ranges={"arith": (0, args.samples)},
            backend=backend,
            engine_args=ENGINE[backend],
            device="cpu",
            cache_dir=str(scratch / "cache"),
            scratch_dir=str(scratch / backend),
        )

    def row(result: TrialResult, wall: float, mode: str) -> dict:
        timings = dict(result.timings)
        if mode == "cold":
            timings["imports_and_startup"] = round(wall - timings["total"], 3)
        return {
            **timings,
            "wall": round(wall, 3),
            "fixed_share": round((wall - timings["evaluate"]) / wall, 3),
            "generated_tokens": result.generated_tokens,
            "accuracy": result.tasks["arith"].correct / args.samples,
        }

    modes = {
        backend: ("cold", "warm", "kept", "worker") if backend == "vllm" else ("cold", "warm", "worker")
        for backend in args.backends
    }
    rounds: dict[str, dict[str, list[dict]]] = {b: {mode: [] for mode in modes[b]} for b in args.backends}
    workers = {
        backend: start_worker(backend, scratch / f"{backend}-worker", scratch / "cache", 18080 + i)
        for i, backend in enumerate(args.backends)
    }
    kept = LocalExecutor(scratch / "vllm-kept", timeout_seconds=600, cache_dir=scratch / "cache", backend="vllm")
    # The first run of a worker, and of the kept fork server, starts what the later runs keep: timed apart.
    first: dict[str, dict[str, dict]] = {b: {} for b in args.backends}
    for backend in args.backends:
        first[backend]["worker"] = row(*run_on_worker(workers[backend][1], spec_for(backend, "first-worker")), "worker")
        if backend == "vllm":
            first[backend]["kept"] = row(*run_forked(kept, spec_for(backend, "first-kept")), "kept")
        print(backend, "first", json.dumps(first[backend]), flush=True)
    for round_ in range(args.rounds):  # the backends alternate, so a slow spell of the machine hits both
        for backend in args.backends:
            spec = spec_for(backend, f"breakdown-{backend}-{round_}")
            spec_file = scratch / f"{backend}.json"
            spec_file.write_text(spec.model_dump_json())
            runners: dict[str, Callable[[], tuple[TrialResult, float]]] = {
                "cold": functools.partial(run_cold, spec_file),
                "warm": functools.partial(run_warm, spec, scratch / f"{backend}-local"),
                "kept": functools.partial(run_forked, kept, spec),
                "worker": functools.partial(run_on_worker, workers[backend][1], spec),
            }
            # The modes take turns at going first: a run slows the next (its merged checkpoint is still
            # being written back to disk), and no mode should always come after the same one.
            order = modes[backend][round_ % len(modes[backend]) :] + modes[backend][: round_ % len(modes[backend])]
            for mode in order:
                rounds[backend][mode].append(row(*runners[mode](), mode))
            print(backend, round_, json.dumps({m: rows[-1] for m, rows in rounds[backend].items()}), flush=True)
    kept.close()
    for process, _ in workers.values():
        process.terminate()
    results = {
        backend: {
            mode: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for mode, rows in by_mode.items()
        }
        for backend, by_mode in rounds.items()
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(
        json.dumps(
            {
                "samples": args.samples,
                "plan": "TIES, 3 experts, SmolLM2-135M bf16",
                "medians": results,
                "first_runs": first,
                "rounds": rounds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
