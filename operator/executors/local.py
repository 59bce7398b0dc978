"""Trial runs as local processes: the executor of `mergesearch run` (no cluster).

Each run gets a directory `<work>/runs/<name>/` with its spec, log, pid record and result, and a line in
`<work>/runs.log` when it starts. Runs are forked by a fork server (`mergesearch_trial_runner.forkserver`)
that has already imported torch and the engine, so a run starts in milliseconds instead of seconds (and
loads its merge into one of the engines that the fork server's engine hosts keep:
`<work>/engine-host.log`). Every run is its own session: it outlives a controller that is killed, and a
restarted controller re-attaches to it through the pid record (checked against the process's start
time, so a recycled pid is not mistaken for it). A run that is gone without a result failed for
infrastructure reasons (a crash, a kill, memory), unless its exit code says the request itself was bad.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mergesearch_trial_runner.cores import usable_cores
from mergesearch_trial_runner.forkserver import process_start_time, write_json
from mergesearch_trial_runner.spec import EXIT_USER_ERROR, TrialResult, TrialSpec

from .base import Executor, RunPhase, RunStatus

KEEP_FAILED_RUNS = 5
RELEASED = "released"  # marks a failed run kept for debugging after the controller let it go


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _alive(record: dict | None, pid_key: str = "pid") -> bool:
    return record is not None and process_start_time(record[pid_key]) == record["start_time"]


def _failed(run_dir: Path) -> bool:
    if (run_dir / "failure.json").exists():
        return True
    result = _read(run_dir / "result.json")
    return result is not None and not result.get("ok", False)


class LocalExecutor(Executor):
    def __init__(
        self,
        work_dir: Path,
        *,
        timeout_seconds: float,
        cache_dir: Path | None = None,
        backend: str = "hf",
        parallel_runs: int = 1,
        env: dict[str, str] | None = None,
    ):
        self.runs_dir = Path(work_dir) / "runs"  # made by the first start: inspecting a search writes nothing
        self.ledger = Path(work_dir) / "runs.log"
        self.engine_host_log = Path(work_dir) / "engine-host.log"  # the fork server's engine hosts
        self.cache_dir = Path(cache_dir or Path(work_dir) / "cache")
        self.timeout_seconds = timeout_seconds
        self.backend = backend  # what the fork server preloads
        # Each run's torch would use every core: parallel runs then oversubscribe the machine, and
        # OpenMP threads that wait for each other spin. On 2 cores, 2 runs with 2 threads each took the
        # quickstart search 498 s against 30 s with 1 thread each. The cores are shared out instead.
        self.cpu_threads = max(1, usable_cores() // parallel_runs)
        self.parallel_runs = parallel_runs
        self.env = env
        self._server: subprocess.Popen[str] | None = None

    def _dir(self, name: str) -> Path:
        return self.runs_dir / name

    def _fork_server(self) -> subprocess.Popen[str]:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen(
                [
                    *(sys.executable, "-m", "mergesearch_trial_runner.forkserver", self.backend),
                    *("--engine-host-log", str(self.engine_host_log), "--engine-hosts", str(self.parallel_runs)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
                env=self.env,
            )
            assert self._server.stdout is not None
            if self._server.stdout.readline().strip() != "ready":
                raise RuntimeError(
                    "the trial fork server did not start; run `python -m mergesearch_trial_runner.forkserver`"
                )
        return self._server

    def warm_up(self) -> None:
        """Start the fork server now (it imports the backend), instead of at the first run."""
        self._fork_server()

    def held(self) -> list[str]:
        """Every run this executor holds: running, or finished and not yet released (a failed run kept for
        debugging after its release is not held)."""
        if not self.runs_dir.exists():
            return []
        return sorted(d.name for d in self.runs_dir.iterdir() if d.is_dir() and not (d / RELEASED).exists())

    def start(self, spec: TrialSpec) -> None:
        run_dir = self._dir(spec.name)
        if any((run_dir / f).exists() for f in ("pid", "result.json", "failure.json")):
            return
        if _alive(_read(run_dir / "queued")):
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = spec.model_copy(
            update={
                "cache_dir": str(self.cache_dir),
                "scratch_dir": str(run_dir / "scratch"),
                "result_file": str(run_dir / "result.json"),
                "cpu_threads": spec.cpu_threads or self.cpu_threads,
            }
        )
        (run_dir / "spec.json").write_text(spec.model_dump_json(indent=1))
        server = self._fork_server()
        write_json(run_dir / "queued", {"pid": server.pid, "start_time": process_start_time(server.pid)})
        assert server.stdin is not None
        server.stdin.write(f"{run_dir}\n")
        server.stdin.flush()
        with self.ledger.open("a") as ledger:  # an audit trail of every run ever started
            ledger.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {spec.name}\n")

    def poll(self, name: str) -> RunStatus:
        run_dir = self._dir(name)
        record = _read(run_dir / "pid")
        seconds = time.time() - record["started"] if record else 0.0
        result = _read(run_dir / "result.json")
        if result is not None:
            parsed = TrialResult.model_validate(result)
            seconds = parsed.timings.get("total", seconds)
            if parsed.ok:
                return RunStatus(RunPhase.SUCCEEDED, result=parsed, seconds=seconds)
            kind = parsed.error_kind or "infrastructure"
            return RunStatus(
                RunPhase.FAILED,
                result=parsed,
                failure=kind,
                cause="UserError" if kind == "user" else "Error",
                reason=parsed.message,
                seconds=seconds,
            )
        failure = _read(run_dir / "failure.json")
        if failure is not None:
            return RunStatus(
                RunPhase.FAILED,
                failure=failure["kind"],
                cause=failure["cause"],
                reason=failure["reason"],
                seconds=seconds,
            )
        if record is not None:
            if _alive(record):
                if seconds > self.timeout_seconds:
                    self._kill(record)
                    return self._fail(
                        name, "infrastructure", "DeadlineExceeded", f"ran over {self.timeout_seconds:.0f}s"
                    )
                return RunStatus(RunPhase.RUNNING, seconds=seconds)
            exit_code = _read(run_dir / "exit_code")
            code = None if exit_code is None else exit_code["code"]
            if code == EXIT_USER_ERROR:
                return self._fail(
                    name, "user", "UserError", f"exited with code {code} without a result; see {run_dir / 'log'}"
                )
            detail = "the process is gone" if code is None else f"exit code {code}"
            return self._fail(name, "infrastructure", "Lost", f"{detail}, no result; see {run_dir / 'log'}")
        if _alive(_read(run_dir / "queued")):
            return RunStatus(RunPhase.RUNNING)  # handed to the fork server, not forked yet
        return RunStatus(RunPhase.MISSING)

    def _fail(self, name: str, kind: str, cause: str, reason: str) -> RunStatus:
        write_json(self._dir(name) / "failure.json", {"kind": kind, "cause": cause, "reason": reason})
        return self.poll(name)

    @staticmethod
    def _kill(record: dict) -> None:
        if _alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record["pid"], signal.SIGKILL)

    def cancel(self, name: str) -> None:
        record = _read(self._dir(name) / "pid")
        if record is not None:
            self._kill(record)

    def release(self, name: str) -> None:
        """Delete a finished run's directory; failed runs stay, the newest KEEP_FAILED_RUNS of them."""
        run_dir = self._dir(name)
        if not _failed(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            return
        (run_dir / RELEASED).touch()
        failed = sorted((d for d in self.runs_dir.iterdir() if _failed(d)), key=lambda d: d.stat().st_mtime)
        for old in failed[:-KEEP_FAILED_RUNS]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Let the fork server go once its children are done (they finish either way)."""
        if self._server is not None and self._server.stdin is not None:
            self._server.stdin.close()
