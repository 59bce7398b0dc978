"""A throwaway PostgreSQL 15 server on a free loopback port, for tests (the Debian package's binaries).

initdb refuses to run as root, so as root the server runs as the `postgres` system user; its data lives
in a fresh temporary directory that is removed on stop.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mergesearch-pg-"))
        self.port = _free_port()
        self.data = self.root / "data"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        # No pipes: the server inherits them from pg_ctl and would hold them open.
        subprocess.run([*prefix, *command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> PostgresServer:
        if not (BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL 15 is not installed ({BIN} missing): apt-get install postgresql")
        self.root.chmod(0o777)  # the server writes its log here
        self.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self._serve()
        return self

    def _serve(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=200"
        log = str(self.root / "server.log")
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start")
        deadline = time.monotonic() + 30
        while subprocess.run(
            [str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not become ready")
            time.sleep(0.2)

    def restart(self, down_seconds: float) -> None:
        """An outage: the server goes away at once (as a crash would), stays down, and comes back with its
        data on the same port; returns when it accepts connections again."""
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        time.sleep(down_seconds)
        self._serve()

    def create_database(self, name: str) -> str:
        subprocess.run(
            [str(BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
            check=True,
            capture_output=True,
        )
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
