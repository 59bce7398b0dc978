"""A warm process that forks one child per trial run, for running trials on one machine.

Importing torch, transformers and the engine takes seconds, as long as a whole trial of a small model at
the lowest fidelity. The fork server pays it once: it imports everything the named backend's trials
will import (`python -m mergesearch_trial_runner.forkserver vllm`; see `cli.warmed_up`), then reads run
directories from stdin, one per line, and forks a child for each that starts with the imports done.
Each child is a run like any other: its own session (it outlives the server and the controller, and is
killed as a group), its pid record in the run directory (so a restarted controller re-attaches to it),
its log, its result file, its exit code (written by the server when it reaps the child).

On a cluster each trial is its own pod and this is not used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when no such process is alive."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19])


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _child(run_dir: Path) -> None:
    """Run one trial in the forked child; never returns (an exception must not reach the server's loop)."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        log = os.open(run_dir / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        pid = os.getpid()
        write_json(run_dir / "pid", {"pid": pid, "start_time": process_start_time(pid), "started": time.time()})
        from .cli import main

        main(["run", str(run_dir / "spec.json")])  # exits the child itself once it has reported
    finally:  # only what escapes main (argparse's SystemExit, an interrupt) gets here
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(1)


def serve(backends: list[str]) -> None:
    from .cli import warmed_up

    # Frozen, the preloaded heap is also shared with the children without being copied: a collection
    # that skips an object does not write to its page.
    with warmed_up(backends):
        _fork_runs()


def _fork_runs() -> None:
    """Fork a child for each run directory read from stdin; once stdin closes, wait for the children."""
    children: dict[int, Path] = {}

    def reap(*_: object) -> None:
        """Record each finished child's exit code as soon as it exits (SIGCHLD)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run_dir = children.pop(pid, None)
            # A run that left a result may already be collected and its directory released.
            if run_dir is not None and run_dir.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    write_json(run_dir / "exit_code", {"code": os.waitstatus_to_exitcode(status)})

    signal.signal(signal.SIGCHLD, reap)
    print("ready", flush=True)
    for line in sys.stdin:
        run_dir = Path(line.strip())
        if not run_dir.is_dir():
            continue
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # register the child before reaping it
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            _child(run_dir)
        children[pid] = run_dir
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    # stdin closed (the controller stopped): the children carry on in their own sessions; the server
    # stays to record their exit codes, then leaves.
    while children:
        time.sleep(0.5)  # SIGCHLD interrupts the sleep and reaps


if __name__ == "__main__":
    serve(sys.argv[1:])
