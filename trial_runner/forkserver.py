"""A warm process that forks one child per trial run, for running trials on one machine.

Importing torch, transformers and the engine takes seconds, as long as a whole trial of a small model at
the lowest fidelity. The fork server pays it once: it imports everything the named backend's trials
will import (`python -m mergesearch_trial_runner.forkserver vllm`; see `cli.warmed_up`), then reads run
directories from stdin, one per line, and forks a child for each that starts with the imports done.
Each child is a run like any other: its own session (it outlives the server and the controller, and is
killed as a group), its pid record in the run directory (so a restarted controller re-attaches to it),
its log, its result file, its exit code (written by the server when it reaps the child).

A fork server also forks engine hosts (`evaluate.engine_host`), one per run that may run at once, each
keeping an engine (vLLM's, or hf's loaded model) across runs, so that a run loads its merge into a running
engine instead of starting one. The server holds the hosts' listening socket (runs that connect while no
host is free wait in its queue), starts another host when one dies while runs remain, and kills the
hosts when it leaves.

On a cluster a pod per trial does not use this; a reused trial pod (a `mergesearch worker`) does.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .evaluate.engine_host import EngineHost, HostAddress

PR_SET_PDEATHSIG = 1


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


class EngineHosts:
    """The fork server's engine hosts, one per run it may run at once, all serving one listening socket
    (the kernel hands each connection to one host that waits in `accept`): forked when runs need them,
    again after one died, killed at the end."""

    def __init__(self, log: Path, count: int) -> None:
        # A Unix socket's path has at most 107 bytes: a short directory of its own, not the work directory.
        self.directory = Path(tempfile.mkdtemp(prefix="mergesearch-engine-"))
        self.address = HostAddress.new(self.directory)
        self.listener = self.address.listen()
        self.log = log
        self.count = count
        self.pids: set[int] = set()
        os.environ.update(self.address.environment())  # every run forked from now on finds the hosts

    def ensure_running(self) -> None:
        """Fork hosts until `count` run (with SIGCHLD blocked or in its handler, so that `exited` sees
        every pid)."""
        server = os.getpid()
        while len(self.pids) < self.count:
            pid = os.fork()
            if pid == 0:
                try:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                    # Die with the server even when it is killed: a host left behind would hold an engine.
                    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                    if os.getppid() != server:
                        os._exit(1)
                    log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(log, 1)
                    os.dup2(log, 2)
                    EngineHost().serve(self.listener)
                finally:
                    os._exit(1)
            self.pids.add(pid)

    def exited(self, pid: int) -> bool:
        if pid not in self.pids:
            return False
        self.pids.discard(pid)
        return True

    def stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.listener.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def serve(backends: list[str], engine_host_log: Path, engine_hosts: int) -> None:
    from .cli import warmed_up

    # Frozen, the preloaded heap is also shared with the children without being copied: a collection
    # that skips an object does not write to its page.
    with warmed_up(backends):
        hosts = EngineHosts(engine_host_log, engine_hosts)
        try:
            _fork_runs(hosts)
        finally:
            hosts.stop()


def _fork_runs(hosts: EngineHosts) -> None:
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
            if hosts.exited(pid):
                if children:  # runs that connect meanwhile wait in the listener's queue for the next host
                    hosts.ensure_running()
                continue  # the run it served, if any, fails on its own (infrastructure, retried)
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
        hosts.ensure_running()
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
    parser = argparse.ArgumentParser(description="fork a trial run for each run directory read from stdin")
    parser.add_argument("backends", nargs="*", help="the evaluation backends whose imports the runs share")
    parser.add_argument("--engine-host-log", type=Path, default=Path("engine-host.log"), help="the engine hosts' log")
    parser.add_argument("--engine-hosts", type=int, default=1, help="engines kept: the runs that may run at once")
    args = parser.parse_args()
    serve(args.backends, args.engine_host_log, args.engine_hosts)
    # Leave without finalizing the interpreter: with vLLM imported that took 1.9 s of CPU, which slowed
    # whatever ran next on the machine (a later trial's merge, by 2-3 s on 2 cores).
    sys.stdout.flush()
    os._exit(0)
