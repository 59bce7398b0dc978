"""`ModelStore`: the store's one public entry point, fetching, reading, uploading and inspecting models by URI."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from ..checkpoint import SAFETENSORS_INDEX, Checkpoint, is_pickled
from .cache import NodeCache
from .errors import StoreError, as_store_errors
from .settings import StoreSettings
from .structure import CONFIG_FILE, RemoteCheckpoint, model_files, open_checkpoint, remote_structure
from .transfer import check_uploaded, make_client, put_object, read_object, upload_file, write_local_dir
from .uris import S3Location, parse_uri

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelStore:
    """Fetch, read and upload models by URI; S3 objects go through a content-addressed cache on local disk.

    Contract:
      * every method is idempotent: calling it again after a success does nothing more than re-check;
        after a failure, it continues where the failed call stopped;
      * safe for concurrent use by threads of one process and by processes (pods) sharing `cache_dir`:
        each object is downloaded by one of them while the others wait, then all use the same blob;
      * raises `StoreError` only (its `retryable` says whether to try again); retryable errors have
        already been retried `settings.attempts` times (and each request `settings.request_attempts`).

    Credentials, endpoint and region come from the environment as boto3 reads it (`AWS_ACCESS_KEY_ID`,
    `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_REGION` or `AWS_DEFAULT_REGION`), or pass a
    ready `client`. `cache_dir` is needed only by `fetch_model` of an `s3://` URI.
    """

    def __init__(
        self, cache_dir: Path | str | None = None, *, settings: StoreSettings | None = None, client: Any = None
    ):
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.settings = settings or StoreSettings()
        self._client = client

    # -- public API ---------------------------------------------------------------------------------

    def fetch_model(self, uri: str | os.PathLike[str]) -> Path:
        """A local directory holding the model at `uri` (config.json, tokenizer files, safetensors weights).

        For `s3://bucket/prefix` the objects directly under the prefix are downloaded into the cache, once
        per node; pickled weights (`*.bin`, `*.pt`, ...) and other frameworks' weights are never downloaded,
        nor shards that the index does not name. The directory returned (of read-only files) opens as a
        `Checkpoint`, and stays valid while the cache is not pruned; a later fetch of a changed prefix returns
        another directory. For a path or `file://` URI it returns the path after checking it is a model.
        """
        location = parse_uri(uri)
        if isinstance(location, Path):
            open_checkpoint(location, os.fspath(uri))
            return location.absolute()
        if self.cache_dir is None:
            raise StoreError(str(location), "this ModelStore has no cache_dir to download into", retryable=False)
        return self._retrying(lambda: self._fetch_s3_model(location))

    def read_bytes(self, uri: str | os.PathLike[str]) -> bytes:
        """The whole content of one small object or file (task JSONL, plans, scores); not cached."""
        location = parse_uri(uri)
        if isinstance(location, Path):
            try:
                return location.read_bytes()
            except FileNotFoundError:
                raise StoreError(os.fspath(uri), "no such file", retryable=False) from None
            except OSError as exc:
                raise StoreError(os.fspath(uri), f"cannot read: {exc}", retryable=False) from None
        return self._retrying(lambda: read_object(self.client, location, max_bytes=self.settings.max_read_bytes))

    def read_text(self, uri: str | os.PathLike[str]) -> str:
        """`read_bytes` as UTF-8 text (task files)."""
        try:
            return self.read_bytes(uri).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StoreError(
                os.fspath(uri), f"not UTF-8 text ({exc.reason} at byte {exc.start})", retryable=False
            ) from None

    def upload_model(
        self, local_dir: Path | str, uri: str | os.PathLike[str], *, extra_files: Mapping[str, bytes] | None = None
    ) -> None:
        """Upload a checkpoint directory (its top-level files) to `uri`, with `extra_files` (name → content)
        beside it, e.g. the plan and the scores JSON.

        Weights go first and config.json and the extra files last, so a reader that finds config.json finds
        the weights complete. An extra file replaces a local file of the same name (e.g. the engine's
        `mergesearch_plan.json`). Large files are uploaded in parts. Objects already under the prefix that this
        upload does not write are left alone. A path or `file://` destination is written as a directory
        (built under a temporary name, then renamed into place).
        """
        local_dir = Path(local_dir)
        extra = dict(extra_files or {})
        open_checkpoint(local_dir, str(local_dir))
        files = sorted(p for p in local_dir.iterdir() if p.is_file() and p.name not in extra)
        for name in extra:
            if not name or "/" in name or name in (".", "..", CONFIG_FILE) or name.endswith(".safetensors"):
                raise StoreError(
                    os.fspath(uri),
                    f"extra file name {name!r} must be a plain file name, and not one of the model's own files",
                    retryable=False,
                )
        pickled = [p.name for p in files if is_pickled(p.name)]
        if pickled:
            raise StoreError(
                os.fspath(uri), f"refusing to upload pickled weights {pickled} from {local_dir}", retryable=False
            )
        location = parse_uri(uri)
        if isinstance(location, Path):
            write_local_dir(location, files, extra)
            return
        for path in sorted(files, key=_upload_order):
            self._retrying(lambda path=path: upload_file(self.client, path, location.child(path.name), self.settings))
        for name, data in extra.items():
            self._retrying(lambda name=name, data=data: put_object(self.client, location.child(name), data))
        self._retrying(lambda: check_uploaded(self.client, location, {p.name: p.stat().st_size for p in files}, extra))

    def write_bytes(self, uri: str | os.PathLike[str], data: bytes) -> None:
        """Write one small object or file (a report beside a merged model), replacing what is there."""
        location = parse_uri(uri)
        if isinstance(location, Path):
            try:
                location.parent.mkdir(parents=True, exist_ok=True)
                location.write_bytes(data)
            except OSError as exc:
                raise StoreError(os.fspath(uri), f"cannot write: {exc}", retryable=False) from None
            return
        self._retrying(lambda: put_object(self.client, location, data))

    def model_structure(self, uri: str | os.PathLike[str]) -> Checkpoint | RemoteCheckpoint:
        """config.json and every tensor's dtype, shape and byte range, without reading (or downloading) a
        weight: a few ranged GETs per safetensors file. For the operator, which validates plans against
        models it never downloads. Selects and refuses files exactly as `Checkpoint.open` does."""
        location = parse_uri(uri)
        if isinstance(location, Path):
            return open_checkpoint(location, os.fspath(uri))
        return self._retrying(lambda: remote_structure(self.client, location))

    # -- S3 --------------------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use; boto3 clients are thread-safe)."""
        if self._client is None:
            with as_store_errors("s3://", "create an S3 client"):
                self._client = make_client(self.settings)
        return self._client

    def _retrying(self, call: Callable[[], T]) -> T:
        settings = self.settings
        retrying = Retrying(
            retry=retry_if_exception(lambda exc: isinstance(exc, StoreError) and exc.retryable),
            stop=stop_after_attempt(settings.attempts),
            wait=wait_random_exponential(multiplier=settings.backoff_seconds, max=30),
            before_sleep=lambda state: log.warning(
                "attempt %d failed, retrying: %s", state.attempt_number, state.outcome.exception()
            ),
            reraise=True,
        )
        return retrying(call)

    def _fetch_s3_model(self, prefix: S3Location) -> Path:
        assert self.cache_dir is not None
        cache = NodeCache(self.cache_dir)
        files, _ = model_files(self.client, prefix, lambda obj: cache.ensure_blob(self.client, obj).read_bytes())
        objects = list(files.values())
        snapshot = cache.snapshot_path(objects)
        if snapshot.is_dir() and all(cache.blob_ok(obj) for obj in objects):
            log.debug("%s: cached in %s", prefix, snapshot)
            return snapshot
        workers = max(1, min(self.settings.workers, len(objects)))
        with ThreadPoolExecutor(workers, thread_name_prefix="store-fetch") as pool:
            list(pool.map(lambda obj: cache.ensure_blob(self.client, obj), objects))  # re-raises the first failure
        with as_store_errors(str(prefix), "cache"):
            return cache.make_snapshot(snapshot, objects, validate=lambda path: open_checkpoint(path, str(prefix)))


def _upload_order(path: Path) -> tuple[int, str]:
    """Weights, then the other files, then the index, then config.json (what marks a model as present)."""
    name = path.name
    rank = 0 if name.endswith(".safetensors") else 3 if name == CONFIG_FILE else 2 if name == SAFETENSORS_INDEX else 1
    return rank, name
