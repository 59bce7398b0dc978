"""The node cache: trial pods on one node share one cache directory (a hostPath), so a model is downloaded once
per node however many trials merge it.

Layout, under the cache directory:

    blobs/<key>          a verified object, read-only; <key> = sha256(ETag, size): the same bytes are one blob
    meta/<key>.json      its ETag, size, source and the size/mtime it was committed with
    partial/<key>.part   a download in progress, continued after a kill (never used until verified)
    locks/<key>.lock     one lock per blob (filelock: flock, released by the kernel if the holder dies)
    snapshots/<id>/      a model directory: relative symlinks to blobs; <id> hashes the file names and keys

A download streams into `partial/` (see `transfer.download`, which resumes it and verifies its size and ETag)
and only then is renamed into `blobs/` with the object's LastModified as its mtime. A blob whose size or
mtime no longer matches its meta file (truncated, written over) is not trusted: it is downloaded again. A
snapshot directory is built under a temporary name and renamed, so it exists only complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from filelock import FileLock

from .errors import StoreError, as_store_errors
from .transfer import content_check, download
from .uris import ListedObject


class NodeCache:
    """The directory layout of this module's docstring; all writes go through temporary names and renames."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("blobs", "meta", "partial", "locks", "snapshots"):
            try:
                (root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(str(root), f"cannot create the cache directory: {exc}", retryable=False) from None

    def blob_path(self, obj: ListedObject) -> Path:
        return self.root / "blobs" / obj.key

    def meta_path(self, obj: ListedObject) -> Path:
        return self.root / "meta" / f"{obj.key}.json"

    def partial_path(self, obj: ListedObject) -> Path:
        return self.root / "partial" / f"{obj.key}.part"

    def lock_path(self, obj: ListedObject) -> Path:
        return self.root / "locks" / f"{obj.key}.lock"

    def snapshot_path(self, objects: Collection[ListedObject]) -> Path:
        manifest = json.dumps(sorted((obj.name, obj.key) for obj in objects)).encode()
        return self.root / "snapshots" / hashlib.sha256(manifest).hexdigest()[:32]

    def blob_ok(self, obj: ListedObject) -> bool:
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

    def ensure_blob(self, client: Any, obj: ListedObject) -> Path:
        """The verified blob of `obj`, downloaded (or continued) first if needed; one process at a time."""
        blob = self.blob_path(obj)
        if self.blob_ok(obj):
            return blob
        with as_store_errors(str(obj.location), "cache"), FileLock(self.lock_path(obj)):
            if self.blob_ok(obj):  # another process finished it while we waited
                return blob
            self.discard_blob(obj)
            part = self.partial_path(obj)
            check = content_check(client, obj)
            download(client, obj, part, check)
            self.commit(obj, part, check.method)
        return blob

    def discard_blob(self, obj: ListedObject) -> None:
        """Remove an untrusted blob (a modified one, or one committed without its meta); hold its lock."""
        for path in (self.meta_path(obj), self.blob_path(obj)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def commit(self, obj: ListedObject, part: Path, method: str) -> None:
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

    def make_snapshot(self, snapshot: Path, objects: Collection[ListedObject], validate: Callable[[Path], Any]) -> Path:
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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
