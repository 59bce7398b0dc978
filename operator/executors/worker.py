"""A worker: one long-lived trial pod that runs trial after trial (`spec.trial.reusePods`).

A fresh trial pod pays its imports and its backend's start every time: with vLLM on CPU, 7.8 s of
imports against 7.1 s of evaluating 100 samples. A worker pays them once. Inside, it is the local
executor (a fork server that has imported the backend, one directory and one forked process per run),
and the operator drives it over HTTP with the same four calls as any executor:

    PUT    /runs/<name>          start (the body is the run's TrialSpec)
    GET    /runs/<name>          poll (a RunStatus)
    DELETE /runs/<name>          cancel
    POST   /runs/<name>/release  release
    GET    /runs                 the runs it holds (how a restarted operator finds them again)
    GET    /healthz              no token needed

Every other request carries the search's token (`Authorization: Bearer ...`; the operator keeps it in a
Secret that the worker pod reads). The server handles one request at a time, as the executor is not
thread-safe; every call is a few file reads or one write to the fork server.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mergesearch_trial_runner.spec import TrialSpec

from .base import RunStatus
from .local import LocalExecutor

PORT = 8080
TOKEN_ENV = "MERGESEARCH_WORKER_TOKEN"
RUN_PATH = re.compile(r"^/runs/(?P<name>[a-z0-9][a-z0-9.-]*)(?P<release>/release)?$")


class WorkerUnreachable(RuntimeError):
    """No answer from the worker (not listening yet, gone, or too slow); the caller decides how long to wait."""


class WorkerError(RuntimeError):
    """The worker answered, and refused (a wrong token, a bad request)."""


def _handler(executor: LocalExecutor, token: str) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per poll would drown the worker's log

        def _reply(self, status: HTTPStatus, body: Any = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[str | None, bool] | None:
            """The run named by the path (None for /runs) and whether it is a release; None when refused."""
            if not hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected):
                self._reply(HTTPStatus.UNAUTHORIZED, {"error": "a wrong or missing token"})
                return None
            if self.path == "/runs":
                return None, False
            match = RUN_PATH.match(self.path)
            if match is None:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})
                return None
            return match["name"], bool(match["release"])

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(HTTPStatus.OK, {"ok": True})
                return
            route = self._route()
            if route is None:
                return
            name, release = route
            if release:
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "release is a POST"})
            elif name is None:
                self._reply(HTTPStatus.OK, {"runs": executor.held()})
            else:
                self._reply(HTTPStatus.OK, executor.poll(name).to_json())

        def do_PUT(self) -> None:
            route = self._route()
            if route is None:
                return
            name, release = route
            if name is None or release:
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "PUT /runs/<name> starts a run"})
                return
            try:
                spec = TrialSpec.model_validate_json(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except ValidationError as exc:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"not a trial spec: {exc}"})
                return
            if spec.name != name:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"the spec is for {spec.name}, the path for {name}"})
                return
            executor.start(spec)
            self._reply(HTTPStatus.ACCEPTED, {"name": name})

        def do_DELETE(self) -> None:
            route = self._route()
            if route is not None and route[0] is not None and not route[1]:
                executor.cancel(route[0])
                self._reply(HTTPStatus.OK, {"name": route[0]})
            elif route is not None:
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "DELETE /runs/<name> cancels a run"})

        def do_POST(self) -> None:
            route = self._route()
            if route is not None and route[0] is not None and route[1]:
                executor.release(route[0])
                self._reply(HTTPStatus.OK, {"name": route[0]})
            elif route is not None:
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "POST /runs/<name>/release releases a run"})

    return Handler


def _require(token: str) -> str:
    if not token:
        raise ValueError(f"a worker needs a token (set {TOKEN_ENV}); it would otherwise run anyone's trials")
    return token


def serve(executor: LocalExecutor, *, host: str, port: int, token: str) -> HTTPServer:
    """A server for the executor's runs; the caller runs `serve_forever()` (or a test, in a thread)."""
    return HTTPServer((host, port), _handler(executor, _require(token)))


class WorkerClient:
    """The operator's end: the executor calls, over HTTP, to one worker."""

    def __init__(self, address: str, token: str, *, timeout: float = 10.0):
        self.base, self.token, self.timeout = f"http://{address}", token, timeout

    def _call(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            self.base + path,
            data=body,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise WorkerError(f"{method} {self.base}{path}: {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out
            raise WorkerUnreachable(f"{method} {self.base}{path}: {exc}") from None

    def start(self, spec: TrialSpec) -> None:
        self._call("PUT", f"/runs/{spec.name}", spec.model_dump_json().encode())

    def poll(self, name: str) -> RunStatus:
        return RunStatus.from_json(self._call("GET", f"/runs/{name}"))

    def cancel(self, name: str) -> None:
        self._call("DELETE", f"/runs/{name}")

    def release(self, name: str) -> None:
        self._call("POST", f"/runs/{name}/release")

    def runs(self) -> list[str]:
        return list(self._call("GET", "/runs")["runs"])


def main(args: argparse.Namespace) -> int:
    """`mergesearch worker`: warm the backend, then serve runs until the pod is deleted."""
    token = _require(os.environ.get(TOKEN_ENV, ""))  # before the warm-up, which takes seconds
    executor = LocalExecutor(
        Path(args.work_dir),
        timeout_seconds=args.timeout_seconds,
        cache_dir=Path(args.cache_dir),
        backend=args.backend,
    )
    executor.warm_up()  # listening only once warm: until then the operator sees a worker that is not ready
    host = args.host or os.environ.get("POD_IP", "127.0.0.1")
    server = serve(executor, host=host, port=args.port or PORT, token=token)
    print(f"worker ready on {server.server_address[0]}:{server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0
