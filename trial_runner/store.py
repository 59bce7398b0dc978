"""The weight store: models and small files from S3, `file://` URIs or plain paths, through a node-wide cache.

Trial pods on one node share one cache directory (a hostPath), so a model is downloaded once per node
however many trials merge it, and the operator reads a remote model's structure (config.json and the
safetensors headers, with ranged GETs) without downloading a weight. This module imports neither torch
nor safetensors: the operator image has neither (import-linter holds that).

Cache layout, under `cache_dir`:

    blobs/<key>          a verified object, read-only; <key> = sha256(ETag, size): the same bytes are one blob
    meta/<key>.json      its ETag, size, source and the size/mtime it was committed with
    partial/<key>.part   a download in progress, continued after a kill (never used until verified)
    locks/<key>.lock     one lock per blob (filelock: flock, released by the kernel if the holder dies)
    snapshots/<id>/      a model directory: relative symlinks to blobs; <id> hashes the file names and keys

A download streams into `partial/`, resuming with a ranged GET pinned to the listed ETag (`If-Match`),
hashes what it writes, checks the size and the ETag (the MD5 of a single-part object, or the MD5 of part
MD5s of a multipart one) and only then renames the file into `blobs/` with the object's LastModified as
its mtime. A blob whose size or mtime no longer matches its meta file (truncated, written over) is not
trusted: it is downloaded again. A snapshot directory is built under a temporary name and renamed, so
it exists only complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from filelock import FileLock
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from .checkpoint import (
    SAFETENSORS_INDEX,
    Checkpoint,
    CheckpointError,
    header_length,
    is_pickled,
    parse_header,
    select_weight_files,
    tensor_layout,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
_CHUNK = 1 << 20  # bytes per read/write/hash step of a download
_HEADER_PROBE = 1 << 16  # first ranged GET of a safetensors file; enough for the headers of most shards
_MD5_ETAG = re.compile(r"^(?P<md5>[0-9a-f]{32})(?:-(?P<parts>\d+))?$")
# A 4xx with one of these codes will fail again the same way: the fix is the secret or the URI.
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403", "AllAccessDisabled"}
)
_TOKEN_CODES = frozenset({"ExpiredToken", "InvalidToken", "TokenRefreshRequired"})
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_RETRYABLE_CODES = frozenset(
    {
        "PreconditionFailed",  # the object changed since it was listed: list again
        "412",
        "InvalidRange",  # a partial file longer than the object now is
        "416",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)
# Weights in other frameworks' formats: never needed to load a safetensors checkpoint, often large.
_FOREIGN_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf", ".onnx", ".tflite", ".ot")
_CREDENTIALS_FIX = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the S3 Secret the trial reads) and that this key may read "
    "and write the bucket"
)

T = TypeVar("T")


class StoreError(Exception):
    """A URI that could not be read or written. `retryable` says whether trying again can help.

    Not retryable: a bad URI, missing bucket, object or prefix, wrong or missing credentials, access
    denied, pickled-only weights, a model that is not a safetensors checkpoint; the message names the URI
    and the fix. Retryable: network failures, a server that went away or throttles, an object that
    changed or arrived truncated or corrupt (nothing of it was committed to the cache).
    """

    def __init__(self, uri: str, message: str, *, retryable: bool):
        super().__init__(f"{uri}: {message}")
        self.uri, self.message, self.retryable = uri, message, retryable

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (multiprocessing, executors)
        return _rebuild_store_error, (self.uri, self.message, self.retryable)


def _rebuild_store_error(uri: str, message: str, retryable: bool) -> StoreError:
    return StoreError(uri, message, retryable=retryable)


@dataclass(frozen=True)
class StoreSettings:
    """How hard to try and how much to move at once. The defaults suit a pod next to S3 (or a cluster store)."""

    attempts: int = 5  # per public call, on retryable errors; each attempt resumes from what is already cached
    backoff_seconds: float = 1.0  # first wait between attempts; jittered, doubling, capped at 30 s
    request_attempts: int = 5  # botocore "standard" retries of one request (connection errors, 5xx, throttling)
    connect_timeout: float = 10.0  # seconds
    read_timeout: float = 60.0  # seconds without a byte before a stalled stream counts as broken
    workers: int = 4  # files of one model transferred in parallel
    # Uploads above this size go in parts of this size (S3 allows 10,000 parts: 640 GiB per file at 64 MiB).
    multipart_bytes: int = 64 * 1024 * 1024
    max_read_bytes: int = 1 << 30  # read_bytes refuses larger objects (it is meant for task files and JSON)
    # "path" or "virtual"; None: path-style when AWS_ENDPOINT_URL names a self-hosted server, else boto3's choice.
    addressing_style: str | None = None


@dataclass(frozen=True)
class RemoteTensor:
    """Where one tensor of a remote checkpoint lies (same fields as `checkpoint.TensorInfo`, `file` a URI)."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str
    start: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A remote model's structure (`plan.tensors.ModelStructure`): its config.json and every tensor's header."""

    uri: str
    config: dict[str, Any]
    tensors: dict[str, RemoteTensor]


@dataclass(frozen=True)
class _S3Location:
    bucket: str
    key: str  # an object key, or a prefix without its trailing "/"

    def child(self, name: str) -> _S3Location:
        return _S3Location(self.bucket, f"{self.key}/{name}" if self.key else name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class _Object:
    """One listed object: the ETag pins the version every later request of it reads."""

    name: str  # relative to the model's prefix
    location: _S3Location
    size: int
    etag: str  # with its quotes, as S3 sends it
    last_modified: datetime

    @property
    def key(self) -> str:
        """The blob key: the same content (ETag and size) anywhere is one blob."""
        return hashlib.sha256(f"{self.etag}\0{self.size}".encode()).hexdigest()[:40]


def _parse_uri(uri: str | os.PathLike[str]) -> _S3Location | Path:
    """`s3://bucket/key` as a location; `file://` URIs and plain paths as a `Path`."""
    text = os.fspath(uri)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(text, "no bucket in the URI; write s3://BUCKET/PREFIX", retryable=False)
        return _S3Location(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(text, "file:// URIs must name a local path (file:///abs/path)", retryable=False)
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise StoreError(
            text, f"unsupported URI scheme {parsed.scheme!r}; use s3://, file:// or a path", retryable=False
        )
    return Path(text).expanduser()


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
        location = _parse_uri(uri)
        if isinstance(location, Path):
            _open_checkpoint(location, os.fspath(uri))
            return location.absolute()
        if self.cache_dir is None:
            raise StoreError(str(location), "this ModelStore has no cache_dir to download into", retryable=False)
        return self._retrying(lambda: self._fetch_s3_model(location))

    def read_bytes(self, uri: str | os.PathLike[str]) -> bytes:
        """The whole content of one small object or file (task JSONL, plans, scores); not cached."""
        location = _parse_uri(uri)
        if isinstance(location, Path):
            try:
                return location.read_bytes()
            except FileNotFoundError:
                raise StoreError(os.fspath(uri), "no such file", retryable=False) from None
            except OSError as exc:
                raise StoreError(os.fspath(uri), f"cannot read: {exc}", retryable=False) from None
        return self._retrying(lambda: self._read_s3_object(location))

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
        _open_checkpoint(local_dir, str(local_dir))
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
        location = _parse_uri(uri)
        if isinstance(location, Path):
            _write_local_dir(location, files, extra)
            return
        for path in sorted(files, key=_upload_order):
            self._retrying(lambda path=path: self._upload_file(path, location.child(path.name)))
        for name, data in extra.items():
            self._retrying(lambda name=name, data=data: self._put(location.child(name), data))
        self._retrying(lambda: self._check_uploaded(location, {p.name: p.stat().st_size for p in files}, extra))

    def model_structure(self, uri: str | os.PathLike[str]) -> Checkpoint | RemoteCheckpoint:
        """config.json and every tensor's dtype, shape and byte range, without reading (or downloading) a
        weight: a few ranged GETs per safetensors file. For the operator, which validates plans against
        models it never downloads. Selects and refuses files exactly as `Checkpoint.open` does."""
        location = _parse_uri(uri)
        if isinstance(location, Path):
            return _open_checkpoint(location, os.fspath(uri))
        return self._retrying(lambda: self._remote_structure(location))

    # -- S3 --------------------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use; boto3 clients are thread-safe)."""
        if self._client is None:
            with _errors("s3://", "create an S3 client"):
                self._client = _make_client(self.settings)
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

    def _list(self, prefix: _S3Location) -> list[_Object]:
        """The objects directly under `prefix/` (one level, like a directory)."""
        objects = []
        with _errors(str(prefix), "list"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=prefix.bucket, Prefix=f"{prefix.key}/" if prefix.key else "", Delimiter="/"
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    name = item["Key"].rsplit("/", 1)[-1]
                    if name not in ("", ".", ".."):  # "" is a folder marker; the others cannot be file names
                        location = _S3Location(prefix.bucket, item["Key"])
                        objects.append(_Object(name, location, item["Size"], item["ETag"], item["LastModified"]))
        return objects

    def _model_files(
        self, prefix: _S3Location, read: Callable[[_Object], bytes]
    ) -> tuple[dict[str, _Object], list[str]]:
        """The objects that make the model (its weights as `Checkpoint.open` would choose them, and every other
        file but pickled and foreign weights) and the weight files' names, in `Checkpoint.open`'s order.
        `read` reads a small object (the index). Refuses (not retryable) a prefix that is not a model."""
        uri = str(prefix)
        listed = {obj.name: obj for obj in self._list(prefix)}
        if not listed:
            raise StoreError(
                uri, "no objects under this prefix; check the bucket and the model's path", retryable=False
            )
        if CONFIG_FILE not in listed:
            raise StoreError(uri, f"no {CONFIG_FILE}; is this a Hugging Face model directory?", retryable=False)
        index = listed.get(SAFETENSORS_INDEX)
        read_index = lambda: _json_object(read(index), str(index.location)) if index else {}  # noqa: E731
        try:
            weights = select_weight_files(listed, read_index, uri)
        except CheckpointError as exc:
            raise StoreError(uri, str(exc).removeprefix(f"{uri}: "), retryable=False) from None
        skipped = sorted(n for n in listed if _is_skipped(n) or (n.endswith(".safetensors") and n not in weights))
        if skipped:
            log.info("%s: not downloading %s", uri, skipped)
        kept = {name: obj for name, obj in sorted(listed.items()) if name in weights or not _is_weight_like(name)}
        return kept, weights

    def _fetch_s3_model(self, prefix: _S3Location) -> Path:
        assert self.cache_dir is not None
        cache = _Cache(self.cache_dir)
        files, _ = self._model_files(prefix, lambda obj: self._ensure_blob(cache, obj).read_bytes())
        objects = list(files.values())
        snapshot = cache.snapshot_path(objects)
        if snapshot.is_dir() and all(cache.blob_ok(obj) for obj in objects):
            log.debug("%s: cached in %s", prefix, snapshot)
            return snapshot
        workers = max(1, min(self.settings.workers, len(objects)))
        with ThreadPoolExecutor(workers, thread_name_prefix="store-fetch") as pool:
            list(pool.map(lambda obj: self._ensure_blob(cache, obj), objects))  # re-raises the first failure
        with _errors(str(prefix), "cache"):
            return cache.make_snapshot(snapshot, objects, validate=lambda path: _open_checkpoint(path, str(prefix)))

    def _ensure_blob(self, cache: _Cache, obj: _Object) -> Path:
        """The verified blob of `obj`, downloaded (or continued) first if needed; one process at a time."""
        blob = cache.blob_path(obj)
        if cache.blob_ok(obj):
            return blob
        with _errors(str(obj.location), "cache"), FileLock(cache.lock_path(obj)):
            if cache.blob_ok(obj):  # another process finished it while we waited
                return blob
            cache.discard_blob(obj)
            part = cache.partial_path(obj)
            check = self._content_check(obj)
            self._download(obj, part, check)
            cache.commit(obj, part, check.method)
        return blob

    def _content_check(self, obj: _Object) -> _ContentCheck:
        """How to verify `obj`'s bytes: the MD5 its ETag gives, unless encryption makes the ETag opaque; for a
        multipart ETag, the MD5 of the parts' MD5s, with the part size from a HEAD of part 1."""
        size_only = _ContentCheck(obj.size, None, None, None)
        match = _MD5_ETAG.match(obj.etag.strip('"').lower())
        if match is None:
            return size_only
        parts = int(match["parts"]) if match["parts"] else None
        request: dict[str, Any] = {"Bucket": obj.location.bucket, "Key": obj.location.key, "IfMatch": obj.etag}
        try:
            with _errors(str(obj.location), "read the metadata of"):
                head = self.client.head_object(**request, **({"PartNumber": 1} if parts else {}))
        except StoreError as exc:
            if exc.retryable or not parts:
                raise
            log.info("%s: no part sizes (%s); checking the size only", obj.location, exc)
            return size_only
        if head.get("ServerSideEncryption", "").startswith("aws:kms") or head.get("SSECustomerAlgorithm"):
            return size_only  # the ETag is no MD5 of the bytes then
        if not parts:
            return _ContentCheck(obj.size, match["md5"], None, None)
        part_size = int(head.get("ContentLength") or 0)
        if not (parts - 1) * part_size < obj.size <= parts * part_size:
            return size_only  # parts of unequal sizes
        return _ContentCheck(obj.size, match["md5"], parts, part_size)

    def _download(self, obj: _Object, part: Path, check: _ContentCheck) -> None:
        """Stream `obj` into `part`, continuing what is there; raises (retryable) on a short or wrong result
        (a wrong one is deleted, a short one kept for the next attempt)."""
        uri = str(obj.location)
        offset = part.stat().st_size if part.exists() else 0
        if offset > obj.size or (offset and check.md5 is None):  # continue only what the ETag will verify
            part.unlink()
            offset = 0
        if offset:
            with part.open("rb") as handle:
                for block in iter(lambda: handle.read(_CHUNK), b""):
                    check.update(block)
        if offset < obj.size or not part.exists():  # (an empty object still needs its empty file)
            request: dict[str, Any] = {"Bucket": obj.location.bucket, "Key": obj.location.key, "IfMatch": obj.etag}
            if offset:
                request["Range"] = f"bytes={offset}-"
            log.info("%s: downloading %d bytes%s", uri, obj.size - offset, f" from byte {offset}" if offset else "")
            with _errors(uri, "download"):
                response = self.client.get_object(**request)
                if offset and not response.get("ContentRange", "").startswith(f"bytes {offset}-"):
                    offset = 0  # the server sent the whole object: start over
                    check.reset()
                with _writable(part, append=bool(offset), uri=uri) as out:
                    for block in response["Body"].iter_chunks(_CHUNK):
                        out.write(block)
                        check.update(block)
        size = part.stat().st_size
        if size != obj.size:
            if size > obj.size:
                part.unlink()
            raise StoreError(
                uri, f"received {size} of {obj.size} bytes; the download will be continued", retryable=True
            )
        if not check.matches():
            part.unlink()
            raise StoreError(
                uri,
                f"downloaded bytes do not match the object's ETag {obj.etag} ({check.method}); discarded",
                retryable=True,
            )

    def _read_s3_object(self, location: _S3Location) -> bytes:
        uri = str(location)
        with _errors(uri, "read"):
            response = self.client.get_object(Bucket=location.bucket, Key=location.key)
            size = int(response["ContentLength"])
            if size > self.settings.max_read_bytes:
                response["Body"].close()
                raise StoreError(
                    uri,
                    f"{size} bytes is more than read_bytes allows ({self.settings.max_read_bytes})",
                    retryable=False,
                )
            data = response["Body"].read()
        match = _MD5_ETAG.match(response.get("ETag", "").strip('"').lower())
        encrypted = response.get("ServerSideEncryption", "").startswith("aws:kms") or response.get(
            "SSECustomerAlgorithm"
        )
        if len(data) != size or (
            match and not match["parts"] and not encrypted and hashlib.md5(data).hexdigest() != match["md5"]
        ):
            raise StoreError(
                uri, f"received {len(data)} bytes that do not match the object's size or ETag", retryable=True
            )
        return data

    def _remote_structure(self, prefix: _S3Location) -> RemoteCheckpoint:
        uri = str(prefix)
        objects, names = self._model_files(prefix, self._range)
        config = _json_object(self._range(objects[CONFIG_FILE]), f"{uri}/{CONFIG_FILE}")
        tensors: dict[str, RemoteTensor] = {}
        for name in names:
            obj = objects[name]
            source = str(obj.location)
            try:
                probe = self._range(obj, 0, min(_HEADER_PROBE, obj.size))
                length = header_length(probe, obj.size, source)
                raw = probe[8 : 8 + length]
                if len(raw) < length:
                    raw += self._range(obj, len(probe), 8 + length)
                header = parse_header(raw, source)
                layout = list(tensor_layout(header, 8 + length, obj.size, source))
            except CheckpointError as exc:
                raise StoreError(source, str(exc).removeprefix(f"{source}: "), retryable=False) from None
            for tensor, dtype, shape, start, end in layout:
                if tensor in tensors:
                    raise StoreError(uri, f"tensor {tensor} appears in two shards", retryable=False)
                tensors[tensor] = RemoteTensor(tensor, dtype, shape, source, start, end)
        return RemoteCheckpoint(uri, config, tensors)

    def _range(self, obj: _Object, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of the listed version of `obj` (all of it by default)."""
        end = obj.size if end is None else end
        if end <= start:
            return b""
        uri = str(obj.location)
        with _errors(uri, "read"):
            response = self.client.get_object(
                Bucket=obj.location.bucket, Key=obj.location.key, IfMatch=obj.etag, Range=f"bytes={start}-{end - 1}"
            )
            data = response["Body"].read()
        if len(data) != end - start:
            raise StoreError(uri, f"asked for bytes {start}-{end - 1}, received {len(data)} bytes", retryable=True)
        return data

    def _upload_file(self, path: Path, location: _S3Location) -> None:
        chunk = self.settings.multipart_bytes
        config = TransferConfig(
            multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=self.settings.workers
        )
        log.info("%s: uploading %d bytes", location, path.stat().st_size)
        with _errors(str(location), "upload"):
            self.client.upload_file(str(path), location.bucket, location.key, Config=config)

    def _put(self, location: _S3Location, data: bytes) -> None:
        with _errors(str(location), "write"):
            self.client.put_object(Bucket=location.bucket, Key=location.key, Body=data)

    def _check_uploaded(self, prefix: _S3Location, sizes: dict[str, int], extra: Mapping[str, bytes]) -> None:
        listed = {obj.name: obj.size for obj in self._list(prefix)}
        expected = {**sizes, **{name: len(data) for name, data in extra.items()}}
        wrong = {name: (listed.get(name), size) for name, size in expected.items() if listed.get(name) != size}
        if wrong:
            raise StoreError(str(prefix), f"after upload, (listed, local) sizes differ: {wrong}", retryable=True)


class _ContentCheck:
    """Hashes a download as it is written and says whether it matches the object's ETag (and size)."""

    def __init__(self, size: int, md5: str | None, parts: int | None, part_size: int | None):
        self.size, self.md5, self.parts, self.part_size = size, md5, parts, part_size
        self.method = "size only" if md5 is None else "multipart MD5" if parts else "MD5"
        self.reset()

    def reset(self) -> None:
        self._seen = 0
        self._part = hashlib.md5()
        self._part_digests: list[bytes] = []
        self._filled = 0  # bytes in the current part

    def update(self, data: bytes | memoryview) -> None:
        self._seen += len(data)
        if self.md5 is None:
            return
        if not self.parts:
            self._part.update(data)
            return
        assert self.part_size is not None
        view = memoryview(data)
        while view:
            room = self.part_size - self._filled
            take = view[:room]
            self._part.update(take)
            self._filled += len(take)
            view = view[len(take) :]
            if self._filled == self.part_size:
                self._part_digests.append(self._part.digest())
                self._part = hashlib.md5()
                self._filled = 0

    def matches(self) -> bool:
        if self._seen != self.size:
            return False
        if self.md5 is None:
            return True
        if not self.parts:
            return self._part.hexdigest() == self.md5
        digests = self._part_digests + ([self._part.digest()] if self._filled else [])
        return len(digests) == self.parts and hashlib.md5(b"".join(digests)).hexdigest() == self.md5


class _Cache:
    """The directory layout of the module docstring; all writes go through temporary names and renames."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("blobs", "meta", "partial", "locks", "snapshots"):
            try:
                (root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(str(root), f"cannot create the cache directory: {exc}", retryable=False) from None

    def blob_path(self, obj: _Object) -> Path:
        return self.root / "blobs" / obj.key

    def meta_path(self, obj: _Object) -> Path:
        return self.root / "meta" / f"{obj.key}.json"

    def partial_path(self, obj: _Object) -> Path:
        return self.root / "partial" / f"{obj.key}.part"

    def lock_path(self, obj: _Object) -> Path:
        return self.root / "locks" / f"{obj.key}.lock"

    def snapshot_path(self, objects: Collection[_Object]) -> Path:
        manifest = json.dumps(sorted((obj.name, obj.key) for obj in objects)).encode()
        return self.root / "snapshots" / hashlib.sha256(manifest).hexdigest()[:32]

    def blob_ok(self, obj: _Object) -> bool:
        """Whether the blob was committed and not touched since: its size and mtime are as committed."""
        try:
            meta = json.loads(self.meta_path(obj).read_text())
            stat = self.blob_path(obj).stat()
        except (OSError, ValueError):
            return False
        return (
            meta.get("etag") == obj.etag
            and meta.get("size") == obj.size == stat.st_size
            and meta.get("mtime_ns") == stat.st_mtime_ns
        )

    def discard_blob(self, obj: _Object) -> None:
        """Remove an untrusted blob (a modified one, or one committed without its meta); hold its lock."""
        for path in (self.meta_path(obj), self.blob_path(obj)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def commit(self, obj: _Object, part: Path, method: str) -> None:
        """Move a verified download into place; its meta file, written last, makes it valid."""
        mtime_ns = int(obj.last_modified.timestamp()) * 1_000_000_000 + obj.last_modified.microsecond * 1000
        part.chmod(0o444)
        os.utime(part, ns=(mtime_ns, mtime_ns))
        blob = self.blob_path(obj)
        os.replace(part, blob)
        stat = blob.stat()
        meta = {
            "source": str(obj.location),
            "etag": obj.etag,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "verified": method,
        }
        _atomic_write(self.meta_path(obj), json.dumps(meta).encode())

    def make_snapshot(self, snapshot: Path, objects: Collection[_Object], validate: Callable[[Path], Any]) -> Path:
        """The snapshot directory of these (committed) blobs, created complete or not at all."""
        if snapshot.is_dir():
            return snapshot
        tmp = Path(tempfile.mkdtemp(prefix=f".{snapshot.name}-", dir=snapshot.parent))
        try:
            for obj in objects:
                (tmp / obj.name).symlink_to(Path("..", "..", "blobs", obj.key))
            validate(tmp)
            try:
                tmp.rename(snapshot)
            except OSError:
                if not snapshot.is_dir():  # not "another process made it first"
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return snapshot


@contextlib.contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """Turn boto3's exceptions into `StoreError`s that say whether to retry and what to fix."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        error = _classify(exc, uri, action)
        if error is None:
            raise
        raise error from exc


def _classify(exc: BaseException, uri: str, action: str) -> StoreError | None:
    cause: BaseException | None = exc
    while cause is not None:  # s3transfer wraps the ClientError of a failed upload
        if isinstance(cause, botocore.exceptions.ClientError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, botocore.exceptions.ClientError):
        error = cause.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"{code or status}: {error.get('Message') or 'no message'}"
        if code in _CREDENTIAL_CODES or (status == 403 and code not in _TOKEN_CODES):
            return StoreError(uri, f"cannot {action} ({detail}); {_CREDENTIALS_FIX}", retryable=False)
        if code in _TOKEN_CODES:
            return StoreError(
                uri, f"cannot {action} ({detail}); renew the session token in the S3 Secret", retryable=False
            )
        if code == "NoSuchBucket":
            return StoreError(
                uri, f"cannot {action}: the bucket does not exist; check the URI and AWS_ENDPOINT_URL", retryable=False
            )
        if code in _MISSING_CODES or status == 404:
            return StoreError(uri, f"cannot {action}: no such object; check the URI", retryable=False)
        if code in ("PreconditionFailed", "412") or status == 412:
            return StoreError(
                uri, f"the object changed while being read ({detail}); it will be listed again", retryable=True
            )
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return StoreError(uri, f"cannot {action} ({detail}); the server may recover", retryable=True)
        return StoreError(uri, f"cannot {action} ({detail})", retryable=False)
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return StoreError(
            uri, f"cannot {action}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", retryable=False
        )
    if isinstance(
        exc,
        botocore.exceptions.HTTPClientError  # includes broken streams and read timeouts
        | botocore.exceptions.ConnectionError
        | botocore.exceptions.IncompleteReadError
        | botocore.exceptions.ChecksumError,
    ):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the S3 endpoint"
        return StoreError(uri, f"cannot {action}: network failure talking to {endpoint} ({exc})", retryable=True)
    if isinstance(exc, ConnectionError | TimeoutError):  # a socket error that botocore did not wrap
        return StoreError(uri, f"cannot {action}: network failure ({exc})", retryable=True)
    if isinstance(exc, OSError):  # the local disk: full, read-only, permissions
        return StoreError(uri, f"cannot {action}: local I/O error ({exc}); check the cache directory", retryable=False)
    if isinstance(exc, botocore.exceptions.BotoCoreError | ValueError):  # e.g. a malformed AWS_ENDPOINT_URL
        return StoreError(uri, f"cannot {action}: {exc}", retryable=False)
    return None


def _make_client(settings: StoreSettings) -> Any:
    self_hosted = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    style = settings.addressing_style or ("path" if self_hosted else None)
    config = Config(
        retries={"mode": "standard", "total_max_attempts": settings.request_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=max(10, 2 * settings.workers),
        s3={"addressing_style": style} if style else None,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return boto3.session.Session().client("s3", region_name=region, config=config)


def _open_checkpoint(path: Path, uri: str) -> Checkpoint:
    if not path.is_dir():
        raise StoreError(uri, "no such directory", retryable=False)
    try:
        return Checkpoint.open(path)
    except CheckpointError as exc:  # name the URI, not the directory it was downloaded into
        message = str(exc).replace(str(path), uri).removeprefix(f"{uri}: ")
        raise StoreError(uri, message, retryable=False) from None
    except (OSError, ValueError) as exc:
        raise StoreError(uri, f"not a readable model directory: {exc}", retryable=False) from None


def _json_object(data: bytes, source: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise StoreError(source, f"not valid JSON ({exc})", retryable=False) from None
    if not isinstance(value, dict):
        raise StoreError(source, "not a JSON object", retryable=False)
    return value


def _is_skipped(name: str) -> bool:
    return is_pickled(name) or name.lower().endswith(_FOREIGN_WEIGHT_SUFFIXES)


def _is_weight_like(name: str) -> bool:
    return _is_skipped(name) or name.endswith(".safetensors")


def _upload_order(path: Path) -> tuple[int, str]:
    """Weights, then the other files, then the index, then config.json (what marks a model as present)."""
    name = path.name
    rank = 0 if name.endswith(".safetensors") else 3 if name == CONFIG_FILE else 2 if name == SAFETENSORS_INDEX else 1
    return rank, name


@contextlib.contextmanager
def _writable(path: Path, *, append: bool, uri: str) -> Iterator[Any]:
    """A file to stream a download into; flushed to disk even when the stream breaks (what came is valid)."""
    try:
        handle = path.open("ab" if append else "wb")
    except OSError as exc:
        raise StoreError(
            uri, f"cannot write {path}: {exc}; free space or move the cache", retryable=False
        ) from None
    try:
        yield handle
    finally:
        try:
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            handle.close()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_local_dir(target: Path, files: list[Path], extra: Mapping[str, bytes]) -> None:
    """Copy a model to a local directory: built beside it under a temporary name, then swapped in."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            for path in files:
                shutil.copyfile(path, tmp / path.name)
            for name, data in extra.items():
                (tmp / name).write_bytes(data)
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise StoreError(str(target), f"cannot write the model directory: {exc}", retryable=False) from None
