"""The local fork server: one forked child per run directory, exit codes recorded, and a server that
survives its runs' directories being released under it (the controller deletes a run's directory as
soon as it has read the result, which can be before the child has exited)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergesearch_trial_runner.spec import EXIT_USER_ERROR


def wait_for(path: Path, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert server.poll() is None, "the fork server died"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path):
    process = subprocess.Popen(
        [sys.executable, "-m", "mergesearch_trial_runner.forkserver", "--engine-host-log", str(tmp_path / "hosts.log")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline().strip() == "ready"
    yield process
    process.stdin.close()
    process.wait(timeout=30)


def submit(server: subprocess.Popen, run_dir: Path) -> None:
    server.stdin.write(f"{run_dir}\n")
    server.stdin.flush()


def test_survives_a_run_directory_released_before_the_child_exits(server, tmp_path: Path) -> None:
    released = tmp_path / "released"
    released.mkdir()
    # The child blocks reading its spec until we write it, so the directory is surely gone before it exits.
    os.mkfifo(released / "spec.json")
    writer = os.open(released / "spec.json", os.O_RDWR)
    submit(server, released)
    wait_for(released / "pid", server)
    shutil.rmtree(released)
    os.write(writer, b"not a spec")
    os.close(writer)

    after = tmp_path / "after"
    after.mkdir()
    (after / "spec.json").write_text("{}")
    submit(server, after)
    wait_for(after / "exit_code", server)
    assert json.loads((after / "exit_code").read_text()) == {"code": EXIT_USER_ERROR}
    assert "spec" in (after / "log").read_text().lower()
