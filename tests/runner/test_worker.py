"""A worker serves the local executor's runs over HTTP: a real tiny-model trial through a real socket."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mergesearch_operator.executors.base import RunPhase
from mergesearch_operator.executors.local import LocalExecutor
from mergesearch_operator.executors.worker import WorkerClient, WorkerError, WorkerUnreachable, serve
from mergesearch_trial_runner.spec import TrialSpec

TOKEN = "s3cret-token"


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[str, LocalExecutor]]:
    executor = LocalExecutor(tmp_path / "work", timeout_seconds=300)
    server = serve(executor, host="127.0.0.1", port=0, token=TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"{host}:{port}", executor
    server.shutdown()
    server.server_close()
    executor.close()


def wait(client: WorkerClient, name: str) -> RunPhase:
    deadline = time.monotonic() + 300
    while (phase := client.poll(name).phase) == RunPhase.RUNNING:
        assert time.monotonic() < deadline, f"{name} never finished"
        time.sleep(0.2)
    return phase


@pytest.mark.slow
def test_runs_one_after_another_through_the_worker(worker, trial_spec: TrialSpec) -> None:
    address, executor = worker
    client = WorkerClient(address, TOKEN)
    assert client.poll("first").phase == RunPhase.MISSING
    client.start(trial_spec.model_copy(update={"name": "first"}))
    client.start(trial_spec.model_copy(update={"name": "first"}))  # idempotent, as every executor's start
    assert wait(client, "first") == RunPhase.SUCCEEDED
    status = client.poll("first")
    assert status.result is not None and status.result.tasks["reverse"].evaluated == 12
    direct = executor.poll("first")
    assert status == direct  # the same status, through JSON and back
    assert client.runs() == ["first"]
    client.release("first")
    assert client.runs() == []

    client.start(trial_spec.model_copy(update={"name": "second", "ranges": {"reverse": (12, 20)}}))
    assert wait(client, "second") == RunPhase.SUCCEEDED
    assert client.poll("second").result.tasks["reverse"].evaluated == 8


def test_a_wrong_token_or_a_bad_request_is_refused(worker, trial_spec: TrialSpec) -> None:
    address, executor = worker
    with pytest.raises(WorkerError, match="401"):
        WorkerClient(address, "guess").start(trial_spec)
    assert executor.held() == []
    client = WorkerClient(address, TOKEN)
    with pytest.raises(WorkerError, match=r"400.*the spec is for fresh, the path for other"):
        client._call("PUT", "/runs/other", trial_spec.model_dump_json().encode())
    with pytest.raises(WorkerError, match=r"400.*not a trial spec"):
        client._call("PUT", "/runs/fresh", b'{"name": "fresh"}')
    with pytest.raises(WorkerError, match="404"):
        client._call("GET", "/elsewhere")
    assert executor.held() == []


def test_a_worker_that_is_not_listening_is_unreachable_not_an_error(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path / "work", timeout_seconds=1)
    server = serve(executor, host="127.0.0.1", port=0, token=TOKEN)
    address = "{}:{}".format(*server.server_address[:2])
    server.server_close()  # the port is closed: a worker not yet warm, or gone
    with pytest.raises(WorkerUnreachable):
        WorkerClient(address, TOKEN, timeout=2).poll("any")


def test_a_worker_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MERGESEARCH_WORKER_TOKEN"):
        serve(LocalExecutor(tmp_path / "work", timeout_seconds=1), host="127.0.0.1", port=0, token="")
