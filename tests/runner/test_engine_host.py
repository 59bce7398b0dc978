"""The engine host: the runs of a fork server take turns at one engine that loads each run's merge in
place, and score exactly as the `hf` backend does on the same merge with a model of its own (which the
vllm backend with an engine of its own also does: tests/evaluate/test_vllm.py); with `hf`, the engine
is the loaded model.

What could go wrong, and what here catches it: weights not replaced (the second expert would score as the
first), keys and values cached for a prompt prefix under the old weights (the runs share a few-shot
prefix longer than one KV block), an engine kept for a model of another shape (a merge of three layers
after four), a host that dies while a run waits for it (the run must still be served), and one that dies
while it serves a run (an infrastructure failure, which is retried).
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from mergesearch_operator.executors.base import RunPhase, RunStatus
from mergesearch_operator.executors.local import LocalExecutor
from mergesearch_trial_runner.cli import load_samples, run_trial
from mergesearch_trial_runner.errors import classify
from mergesearch_trial_runner.evaluate.engine_host import EngineHostLost, HostAddress, HostedEvaluator
from mergesearch_trial_runner.evaluate.settings import VLLMSettings
from mergesearch_trial_runner.merge.engine import merge_to_directory
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import Counts, TrialSpec
from mergesearch_trial_runner.store import ModelStore
from tests.runner.runs import run_to_the_end

pytestmark = pytest.mark.slow

# Blocks of 32 tokens (the least on CPU): the few-shot prefix and BOS fill one, which prefix caching keeps.
ENGINE = {"enforce_eager": True, "kv_cache_gib": 1, "engine_args": {"block_size": 32}}
FEW_SHOT = "rev abcde=edcba\nrev bbcad=dacbb\n"


def expert_spec(world, tmp_path: Path, name: str, expert: str, layers: int = 4) -> TrialSpec:
    """`expert`'s task vector on the tiny base over its first `layers` layers, 16 samples of reverse."""
    plan = MergePlan.model_validate(
        {
            "models": {"base": str(world.model("base")), expert: str(world.model(expert))},
            "base_model": "base",
            "slices": [
                {
                    "method": "task_arithmetic",
                    "base": {"model": "base", "layers": [0, layers]},
                    "sources": [{"model": expert, "layers": [0, layers], "params": {"weight": 1.0}}],
                }
            ],
        }
    )
    task = {"name": "reverse", "data": str(world.split("reverse", "search")), "few_shot": FEW_SHOT, "max_new_tokens": 8}
    return TrialSpec(
        name=name,
        plan=plan,
        tasks=[task],
        ranges={"reverse": (0, 16)},
        backend="vllm",
        engine_args=ENGINE,
        cache_dir=str(tmp_path / "cache"),
        scratch_dir=str(tmp_path / "scratch" / name),
        result_file=str(tmp_path / "results" / f"{name}.json"),
    )


def hf_outcome(spec: TrialSpec) -> tuple[Counts, int]:
    """The same trial scored by the hf backend in this process: its counts and its generated tokens
    (which tell models apart even where both answer nothing right, as behind this few-shot prefix)."""
    result = run_trial(spec.model_copy(update={"backend": "hf", "engine_args": {"device": "cpu"}}))
    return result.tasks["reverse"], result.generated_tokens


def outcome(status: RunStatus) -> tuple[Counts, int]:
    assert status.phase == RunPhase.SUCCEEDED, status.reason
    assert status.result is not None
    return status.result.tasks["reverse"], status.result.generated_tokens


def host_pids(executor: LocalExecutor) -> list[int]:
    return [int(p) for p in re.findall(r"engine host (\d+): serving", executor.engine_host_log.read_text())]


@pytest.fixture
def executor(tmp_path: Path):
    executor = LocalExecutor(tmp_path / "work", timeout_seconds=300, backend="vllm")
    yield executor
    executor.close()


def test_runs_share_one_engine_and_score_as_hf(world, tmp_path: Path, executor: LocalExecutor) -> None:
    order = [("reverse", 4), ("sort", 4), ("reverse", 3), ("reverse", 4)]
    specs = [expert_spec(world, tmp_path, f"run{i}", expert, layers) for i, (expert, layers) in enumerate(order)]
    own = expert_spec(world, tmp_path, "own", "sort")
    specs.append(own.model_copy(update={"engine_args": {**ENGINE, "keep_engine": False}}))
    statuses = [run_to_the_end(executor, spec) for spec in specs]
    outcomes = [outcome(status) for status in statuses]
    for spec, hosted in zip(specs, outcomes, strict=True):
        assert hosted == hf_outcome(spec), spec.name
    assert outcomes[0] != outcomes[1], "the two experts score alike: this test could not see stale weights"

    log = executor.engine_host_log.read_text()
    loads = re.findall(r"engine host: (started an engine for|merged in place for) \S+/(run\d)/", log)
    assert loads == [
        ("started an engine for", "run0"),
        ("merged in place for", "run1"),  # same shape: the engine is kept, the merge computed into it
        ("started an engine for", "run2"),  # three layers: another engine
        ("started an engine for", "run3"),  # and back
    ]
    assert "experts in cpu (the experts need" in log
    assert len(host_pids(executor)) == 1
    assert "/own/" not in log  # an engine of its own, in the run's process
    assert "engine host" not in (executor.runs_dir / "own" / "log").read_text()
    assert "engine host: merged in place (experts in cpu" in (executor.runs_dir / "run1" / "log").read_text()
    assert not (Path(specs[1].scratch_dir) / "merged").exists()  # no checkpoint written


def test_hf_runs_share_one_loaded_model_and_score_as_their_own(world, tmp_path: Path) -> None:
    """The hf backend's engine is the loaded transformers model: kept by the host, merged into in place."""
    executor = LocalExecutor(tmp_path / "work", timeout_seconds=300, backend="hf")
    try:
        order = [("reverse", 4), ("sort", 4), ("reverse", 3)]
        specs = [
            expert_spec(world, tmp_path, f"run{i}", expert, layers).model_copy(
                update={"backend": "hf", "engine_args": {"device": "cpu"}}
            )
            for i, (expert, layers) in enumerate(order)
        ]
        outcomes = [outcome(run_to_the_end(executor, spec)) for spec in specs]
        for spec, hosted in zip(specs, outcomes, strict=True):
            assert hosted == hf_outcome(spec), spec.name  # in this process: a model of its own, from memory
        assert outcomes[0] != outcomes[1], "the two experts score alike: this test could not see stale weights"
        log = executor.engine_host_log.read_text()
        loads = re.findall(r"engine host: (started an engine for|merged in place for) \S+/(run\d)/", log)
        assert loads == [
            ("started an engine for", "run0"),
            ("merged in place for", "run1"),
            ("started an engine for", "run2"),  # three layers: another model
        ]
        assert not (Path(specs[1].scratch_dir) / "merged").exists()  # no checkpoint written
    finally:
        executor.close()


def test_a_dead_host_is_replaced_for_the_run_waiting(world, tmp_path: Path, executor: LocalExecutor) -> None:
    first = run_to_the_end(executor, expert_spec(world, tmp_path, "first", "reverse"))
    assert first.phase == RunPhase.SUCCEEDED, first.reason
    [host] = host_pids(executor)

    # The host hangs, then dies, while a run wants it: the run waits in the fork server's queue for
    # the next host (whether it connected before the death or after).
    os.kill(host, signal.SIGSTOP)
    waiting = expert_spec(world, tmp_path, "waiting", "sort")
    executor.start(waiting)
    log = executor.runs_dir / "waiting" / "log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "waiting for a host" in log.read_text()):
        assert time.monotonic() < deadline, "the run never asked for a host"
        time.sleep(0.05)
    time.sleep(1.0)
    os.kill(host, signal.SIGKILL)
    assert outcome(run_to_the_end(executor, waiting)) == hf_outcome(waiting)
    assert len(host_pids(executor)) == 2


class DyingHost:
    """A fake engine host (named so): answers the load like a host, then dies in the middle of the
    trial's first request. The real host is killed in the test above; here the moment is exact."""

    def __init__(self, address: HostAddress, context_len: int) -> None:
        self.listener = address.listen()
        self.context_len = context_len
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with self.listener.accept() as connection:
            assert json.loads(connection.recv_bytes())["op"] == "load"
            loaded = {"ok": True, "reused": True, "seconds": 0.0, "context_len": self.context_len}
            connection.send_bytes(json.dumps(loaded).encode())
            connection.recv_bytes()  # the first request: the host dies before it answers


def test_a_host_lost_mid_request_is_an_infrastructure_failure(world, tmp_path: Path) -> None:
    address = HostAddress.new(tmp_path)
    host = DyingHost(address, context_len=64)
    spec = expert_spec(world, tmp_path, "lost", "reverse")
    merged = Path(spec.scratch_dir) / "merged"
    merge_to_directory(spec.plan, merged, model_dirs={n: Path(u) for n, u in spec.plan.models.items()})
    settings = VLLMSettings.model_validate(ENGINE)
    evaluator = HostedEvaluator(address=address, backend="vllm", model=merged, settings=settings)
    samples = load_samples(ModelStore(spec.cache_dir), spec.tasks[0], spec)
    with pytest.raises(EngineHostLost) as lost:
        evaluator.evaluate(task=spec.tasks[0], samples=samples)
    host.thread.join(timeout=10)
    assert classify(lost.value) == ("infrastructure", f"EngineHostLost: {lost.value}")
    evaluator.close()
