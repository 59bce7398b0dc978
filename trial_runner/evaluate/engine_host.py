"""One engine for many trials: the engine hosts of a fork server.

Starting an engine (building the model, allocating the KV cache, reading the weights) took 3.0 s of a
13.6 s vLLM trial at the lowest fidelity; loading a merge into a running engine takes 0.4 s
(bench/trial_breakdown.py, SmolLM2-135M on 2 cores). A fork server (a local search, a reused trial pod)
therefore forks engine hosts beside its runs, one per run it may run at once, for either backend: a
vLLM engine, or for `hf` the loaded transformers model (both `KeptEngine`s). A trial hands the host its
backend, its merge plan and the experts' directories in the node cache; the host computes the merge in
the engine's process from experts it keeps resident there, straight into the engine's weights
(`KeptEngine.load_merge`, `merge.resident`): no checkpoint is written or read. A host starts an engine
again only when the merge is not one its engine can take: another backend or `engine_identity` (a
depth-wise merge with another number of layers, other tokenizer files, other settings) or another
thread count. Then it writes the merge to the trial's scratch directory and starts the engine on it.
With `merge_in_place` off (or an uploaded output, which needs the files anyway) the trial writes the
merge itself and the host loads it from there (`KeptEngine.load_weights`).

A trial keeps everything that decides a score (prompts, token budgets, stop handling, extraction):
its `HostedEvaluator` is a backend whose two primitives (greedy generation and continuation
log-likelihood, on token ids) run in the host's engine. A hosted trial scores exactly as a trial with
its own engine.

The wire: a Unix socket through `multiprocessing.connection`, which authenticates every client with
the fork server's random key, carrying JSON as bytes (nothing is unpickled). The hosts share one
listening socket, and a host serves one client at a time, from loading its weights to closing its
evaluator. A trial that is killed frees its host once the engine has finished the call in progress. If
a host dies, its trial fails as an infrastructure error (retried) and the fork server starts another.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, NoReturn

from ..checkpoint import CARRIED_FILES
from ..errors import classify
from ..plan.ir import MergePlan
from .base import Evaluator, KeptEngine
from .prompts import ContinuationRequest, GenerationRequest, PromptBuilder, stop_token_ids
from .registry import open_evaluator, validate_settings
from .settings import TRIAL_SIDE, KeptEngineSettings

SOCKET_ENV = "MERGESEARCH_ENGINE_HOST"
KEY_ENV = "MERGESEARCH_ENGINE_HOST_KEY"


def engine_identity(backend: str, config: Mapping[str, Any], files: Path, settings: KeptEngineSettings) -> str:
    """What an engine is built for, as a digest: the backend and its settings, the model's config and the
    tokenizer's and generation files in `files`. Two models of one identity differ in their weights only,
    which an engine can load in place (`load_weights`, `load_merge`)."""
    engine_settings = settings.model_dump_json(exclude=set(TRIAL_SIDE))
    digest = hashlib.sha256(f"{backend}\0{engine_settings}\0".encode())
    digest.update(b"config.json\0" + json.dumps(config, sort_keys=True).encode() + b"\0")
    for name in CARRIED_FILES:
        if (files / name).is_file():
            digest.update(name.encode() + b"\0" + (files / name).read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class HostAddress:
    """Where a fork server's engine host listens, and the key its clients authenticate with. The fork
    server puts both in its children's environment."""

    socket: str
    key: bytes

    @classmethod
    def new(cls, directory: Path) -> HostAddress:
        return cls(str(directory / "engine-host.sock"), os.urandom(32))

    def listen(self) -> Listener:
        return Listener(self.socket, family="AF_UNIX", backlog=64, authkey=self.key)

    @classmethod
    def from_environment(cls) -> HostAddress | None:
        socket = os.environ.get(SOCKET_ENV)
        return cls(socket, bytes.fromhex(os.environ[KEY_ENV])) if socket else None

    def environment(self) -> dict[str, str]:
        return {SOCKET_ENV: self.socket, KEY_ENV: self.key.hex()}


@dataclass(frozen=True)
class PlannedMerge:
    """A merge for the host to compute itself (see the module's doc): the plan, each model's directory in
    the node cache, the torch device the merge computes on (the trial's), and where to write it when an
    engine must be started on it."""

    plan: MergePlan
    model_dirs: Mapping[str, Path]
    device: str
    directory: Path

    def request(self) -> dict[str, Any]:
        return {
            "plan": self.plan.model_dump_json(),
            "models": {name: str(path.resolve()) for name, path in self.model_dirs.items()},
            "device": self.device,
            "directory": str(self.directory.resolve()),
        }

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> PlannedMerge:
        return cls(
            MergePlan.model_validate_json(request["plan"]),
            {name: Path(path) for name, path in request["models"].items()},
            request["device"],
            Path(request["directory"]),
        )


class EngineHostLost(RuntimeError):
    """The host went away during a request (killed, out of memory): an infrastructure failure."""


class EngineHost:
    """Serves one client at a time, with one engine that outlives its clients."""

    def __init__(self) -> None:
        import torch

        self.engine: KeptEngine | None = None
        self.built_for: tuple[str, int] | None = None  # the engine's identity and torch threads
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op in its process; later engines
        # still need the real one.
        self._set_torch_threads = torch.set_num_threads

    def serve(self, listener: Listener) -> NoReturn:
        """Serve the clients of `listener` until the process is killed. The fork server opens the
        listener and keeps it: clients that connect while a host starts, or after one died, wait in its
        queue for the next host."""
        print(f"engine host {os.getpid()}: serving {listener.address}", flush=True)
        while True:
            try:
                connection = listener.accept()
            except OSError as error:  # includes a client that failed to authenticate
                print(f"engine host: refused a client: {error}", flush=True)
                continue
            with connection:
                self._serve_client(connection)

    def _serve_client(self, connection: Connection) -> None:
        while True:
            try:
                request = json.loads(connection.recv_bytes())
            except (EOFError, OSError):  # the trial closed its evaluator, or was killed
                return
            try:
                reply = {"ok": True, **self._handle(request)}
            except Exception as error:  # reported to the trial, which classifies and reports it
                user_error = classify(error)[0] == "user"  # as a trial with its own engine would fail
                reply = {"ok": False, "error": f"{type(error).__name__}: {error}", "user_error": user_error}
                print(f"engine host: {request.get('op')} failed: {reply['error']}", flush=True)
                if not user_error:  # the engine may be broken: the next trial starts a new one
                    self._drop_engine()
            try:
                connection.send_bytes(json.dumps(reply).encode())
            except OSError:
                return

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "load":
            backend = request["backend"]
            settings = validate_settings(backend, request["settings"])
            threads = int(request["threads"])
            if "plan" in request:
                return self._load_merge(PlannedMerge.from_request(request), backend, settings, threads=threads)
            return self._load(Path(request["model"]), backend, settings, threads=threads)
        if self.engine is None:
            raise RuntimeError(f"{op} before load: the engine host has no model loaded")
        # The host runs the backend's own primitives (a friend of the backends' evaluators).
        if op == "generate":
            requests = [GenerationRequest(**r) for r in request["requests"]]
            return {"tokens": self.engine._generate(requests, stop=request["stop"])}
        if op == "loglikelihoods":
            requests_ = [ContinuationRequest(**r) for r in request["requests"]]
            return {"scores": self.engine._loglikelihoods(requests_)}
        raise ValueError(f"unknown engine host request {op!r}")

    def _load_merge(
        self, merge: PlannedMerge, backend: str, settings: KeptEngineSettings, *, threads: int
    ) -> dict[str, Any]:
        from ..merge.engine import merge_to_directory, open_checkpoints
        from ..plan.tensors import plan_tensors

        started = time.perf_counter()
        checkpoints = open_checkpoints(merge.plan, merge.model_dirs)
        lowered = plan_tensors(merge.plan, checkpoints)
        identity = engine_identity(backend, lowered.config, checkpoints[lowered.config_model].path, settings)
        fits = self.engine is not None and self.built_for == (identity, threads)
        if fits and self.engine is not None and self.engine.can_merge_in_place:
            limit = None if settings.resident_gib is None else int(settings.resident_gib * (1 << 30))
            try:
                report = self.engine.load_merge(merge.plan, merge.model_dirs, device=merge.device, limit_bytes=limit)
            except BaseException:  # stopped halfway, the engine holds some layers of each model: start afresh
                self._drop_engine()
                raise
            seconds = time.perf_counter() - started
            print(
                f"engine host: merged in place for {merge.directory} in {seconds:.2f} s (merge "
                f"{report['merge_seconds']:.2f} s, load {report['load_seconds']:.2f} s); experts in "
                f"{report['where']} ({report['reason']})",
                flush=True,
            )
            context_len = self.engine.prompts.context_len
            return {"reused": True, "in_place": report, "seconds": seconds, "context_len": context_len}
        # Through a written checkpoint, as a trial without a host: an engine of another identity starts on it.
        if not fits:
            self._drop_engine()  # its memory is free before the merge is written
            self._set_torch_threads(threads)  # the merge's threads: the trial's
        merge_to_directory(merge.plan, merge.directory, model_dirs=merge.model_dirs, device=merge.device)
        return self._load(merge.directory, backend, settings, threads=threads)

    def _load(self, model: Path, backend: str, settings: KeptEngineSettings, *, threads: int) -> dict[str, Any]:
        started = time.perf_counter()
        config = json.loads((model / "config.json").read_text())  # a directory the trial wrote
        wanted = (engine_identity(backend, config, model, settings), threads)
        if self.engine is not None and self.built_for == wanted:
            self.engine.load_weights(model)
            reused = True
        else:
            self._drop_engine()
            # The engine computes on torch's threads as they are when it starts (vLLM ignores later
            # changes): the trial's, as if the engine ran in the trial's process.
            self._set_torch_threads(threads)
            engine = open_evaluator(backend, model=model, settings=settings)
            assert isinstance(engine, KeptEngine), f"the {backend} backend cannot be kept by a host"
            self.engine, self.built_for = engine, wanted
            reused = False
        seconds = time.perf_counter() - started
        done = "loaded weights in place from" if reused else "started an engine for"
        print(f"engine host: {done} {model} in {seconds:.2f} s", flush=True)
        return {"reused": reused, "seconds": seconds, "context_len": self.engine.prompts.context_len}

    def _drop_engine(self) -> None:
        if self.engine is not None:
            engine, self.engine, self.built_for = self.engine, None, None
            engine.close()


class HostedEvaluator(Evaluator):
    """A backend with its engine in the fork server's engine host (see the module's doc)."""

    name = "hosted"

    @classmethod
    def preload(cls) -> None:
        """Nothing beyond transformers (its tokenizer), which every trial process imports."""

    def __init__(
        self, *, address: HostAddress, backend: str, model: Path | PlannedMerge, settings: KeptEngineSettings
    ) -> None:
        import torch
        from transformers import AutoTokenizer

        if isinstance(model, PlannedMerge):  # the tokenizer and generation files a merge carries: its config model's
            path, what = model.model_dirs[model.plan.config_model].resolve(), model.request()
        else:
            path = Path(model).resolve()
            what = {"model": str(path)}
        print("engine host: waiting for a host", file=sys.stderr, flush=True)
        self._connection = Client(address.socket, family="AF_UNIX", authkey=address.key)
        # The trial's threads (its share of the cores) are the engine's, as in the trial's own process.
        threads = torch.get_num_threads()
        self._send("load", **what, backend=backend, settings=settings.model_dump(mode="json"), threads=threads)
        tokenizer = AutoTokenizer.from_pretrained(path)  # while the host loads
        loaded = self._receive("load")
        if loaded.get("in_place"):
            where = loaded["in_place"]
            done = f"merged in place (experts in {where['where']}: {where['reason']})"
        else:
            done = "loaded weights in place" if loaded["reused"] else "started an engine"
        print(f"engine host: {done} in {loaded['seconds']:.2f} s", file=sys.stderr, flush=True)
        super().__init__(prompts=PromptBuilder(tokenizer, loaded["context_len"], stop_token_ids(tokenizer, path)))

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        self._send(op, **fields)
        return self._receive(op)

    def _send(self, op: str, **fields: Any) -> None:
        try:
            self._connection.send_bytes(json.dumps({"op": op, **fields}).encode())
        except OSError as error:
            raise self._lost(op, error) from None

    def _receive(self, op: str) -> dict[str, Any]:
        try:
            reply = json.loads(self._connection.recv_bytes())
        except (EOFError, OSError) as error:
            raise self._lost(op, error) from None
        if not reply["ok"]:
            raise (ValueError if reply["user_error"] else RuntimeError)(f"engine host: {reply['error']}")
        return reply

    @staticmethod
    def _lost(op: str, error: Exception) -> EngineHostLost:
        return EngineHostLost(
            f"the engine host went away during {op} ({error or 'connection closed'}); "
            "see engine-host.log beside the runs"
        )

    def _generate(self, requests: Sequence[GenerationRequest], *, stop: Sequence[str]) -> list[list[int]]:
        return self._call("generate", requests=[asdict(r) for r in requests], stop=list(stop))["tokens"]

    def _loglikelihoods(self, requests: Sequence[ContinuationRequest]) -> list[float]:
        return self._call("loglikelihoods", requests=[asdict(r) for r in requests])["scores"]

    def _release(self) -> None:
        self._connection.close()
