"""Moving bytes: the S3 client, listing, verified and resumable downloads, ranged reads, uploads, and the local
directory a `file://` upload writes.

A download streams into a partial file, resuming with a ranged GET pinned to the listed ETag (`If-Match`),
hashes what it writes and checks the size and the ETag (the MD5 of a single-part object, or the MD5 of part
MD5s of a multipart one); a short download is kept to be continued, a wrong one deleted. Every function
raises `StoreError` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from .errors import StoreError, as_store_errors
from .settings import StoreSettings
from .uris import ListedObject, S3Location

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes per read/write/hash step of a download
_MD5_ETAG = re.compile(r"^(?P<md5>[0-9a-f]{32})(?:-(?P<parts>\d+))?$")


def make_client(settings: StoreSettings) -> Any:
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


def list_objects(client: Any, prefix: S3Location) -> list[ListedObject]:
    """The objects directly under `prefix/` (one level, like a directory)."""
    objects = []
    with as_store_errors(str(prefix), "list"):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=prefix.bucket, Prefix=f"{prefix.key}/" if prefix.key else "", Delimiter="/"
        )
        for page in pages:
            for item in page.get("Contents", ()):
                name = item["Key"].rsplit("/", 1)[-1]
                if name not in ("", ".", ".."):  # "" is a folder marker; the others cannot be file names
                    location = S3Location(prefix.bucket, item["Key"])
                    objects.append(ListedObject(name, location, item["Size"], item["ETag"], item["LastModified"]))
    return objects


class ContentCheck:
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


def content_check(client: Any, obj: ListedObject) -> ContentCheck:
    """How to verify `obj`'s bytes: the MD5 its ETag gives, unless encryption makes the ETag opaque; for a
    multipart ETag, the MD5 of the parts' MD5s, with the part size from a HEAD of part 1."""
    size_only = ContentCheck(obj.size, None, None, None)
    match = _MD5_ETAG.match(obj.etag.strip('"').lower())
    if match is None:
        return size_only
    parts = int(match["parts"]) if match["parts"] else None
    request: dict[str, Any] = {"Bucket": obj.location.bucket, "Key": obj.location.key, "IfMatch": obj.etag}
    try:
        with as_store_errors(str(obj.location), "read the metadata of"):
            head = client.head_object(**request, **({"PartNumber": 1} if parts else {}))
    except StoreError as exc:
        if exc.retryable or not parts:
            raise
        log.info("%s: no part sizes (%s); checking the size only", obj.location, exc)
        return size_only
    if head.get("ServerSideEncryption", "").startswith("aws:kms") or head.get("SSECustomerAlgorithm"):
        return size_only  # the ETag is no MD5 of the bytes then
    if not parts:
        return ContentCheck(obj.size, match["md5"], None, None)
    part_size = int(head.get("ContentLength") or 0)
    if not (parts - 1) * part_size < obj.size <= parts * part_size:
        return size_only  # parts of unequal sizes
    return ContentCheck(obj.size, match["md5"], parts, part_size)


def download(client: Any, obj: ListedObject, part: Path, check: ContentCheck) -> None:
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
        with as_store_errors(uri, "download"):
            response = client.get_object(**request)
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
        raise StoreError(uri, f"received {size} of {obj.size} bytes; the download will be continued", retryable=True)
    if not check.matches():
        part.unlink()
        raise StoreError(
            uri,
            f"downloaded bytes do not match the object's ETag {obj.etag} ({check.method}); discarded",
            retryable=True,
        )


@contextlib.contextmanager
def _writable(path: Path, *, append: bool, uri: str) -> Iterator[Any]:
    """A file to stream a download into; flushed to disk even when the stream breaks (what came is valid)."""
    try:
        handle = path.open("ab" if append else "wb")
    except OSError as exc:
        raise StoreError(uri, f"cannot write {path}: {exc}; free space or move the cache", retryable=False) from None
    try:
        yield handle
    finally:
        try:
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            handle.close()


def read_object(client: Any, location: S3Location, *, max_bytes: int) -> bytes:
    """The whole object at `location`, checked against its size and (single-part, unencrypted) MD5 ETag."""
    uri = str(location)
    with as_store_errors(uri, "read"):
        response = client.get_object(Bucket=location.bucket, Key=location.key)
        size = int(response["ContentLength"])
        if size > max_bytes:
            response["Body"].close()
            raise StoreError(uri, f"{size} bytes is more than read_bytes allows ({max_bytes})", retryable=False)
        data = response["Body"].read()
    match = _MD5_ETAG.match(response.get("ETag", "").strip('"').lower())
    encrypted = response.get("ServerSideEncryption", "").startswith("aws:kms") or response.get("SSECustomerAlgorithm")
    if len(data) != size or (
        match and not match["parts"] and not encrypted and hashlib.md5(data).hexdigest() != match["md5"]
    ):
        raise StoreError(uri, f"received {len(data)} bytes that do not match the object's size or ETag", retryable=True)
    return data


def read_range(client: Any, obj: ListedObject, start: int = 0, end: int | None = None) -> bytes:
    """Bytes [start, end) of the listed version of `obj` (all of it by default)."""
    end = obj.size if end is None else end
    if end <= start:
        return b""
    uri = str(obj.location)
    with as_store_errors(uri, "read"):
        response = client.get_object(
            Bucket=obj.location.bucket, Key=obj.location.key, IfMatch=obj.etag, Range=f"bytes={start}-{end - 1}"
        )
        data = response["Body"].read()
    if len(data) != end - start:
        raise StoreError(uri, f"asked for bytes {start}-{end - 1}, received {len(data)} bytes", retryable=True)
    return data


def upload_file(client: Any, path: Path, location: S3Location, settings: StoreSettings) -> None:
    chunk = settings.multipart_bytes
    config = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=settings.workers)
    log.info("%s: uploading %d bytes", location, path.stat().st_size)
    with as_store_errors(str(location), "upload"):
        client.upload_file(str(path), location.bucket, location.key, Config=config)


def put_object(client: Any, location: S3Location, data: bytes) -> None:
    with as_store_errors(str(location), "write"):
        client.put_object(Bucket=location.bucket, Key=location.key, Body=data)


def check_uploaded(client: Any, prefix: S3Location, sizes: dict[str, int], extra: Mapping[str, bytes]) -> None:
    listed = {obj.name: obj.size for obj in list_objects(client, prefix)}
    expected = {**sizes, **{name: len(data) for name, data in extra.items()}}
    wrong = {name: (listed.get(name), size) for name, size in expected.items() if listed.get(name) != size}
    if wrong:
        raise StoreError(str(prefix), f"after upload, (listed, local) sizes differ: {wrong}", retryable=True)


def write_local_dir(target: Path, files: list[Path], extra: Mapping[str, bytes]) -> None:
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
