"""Where a model or file lives: `s3://bucket/key` URIs, `file://` URIs and plain paths, and listed S3 objects."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import StoreError


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # an object key, or a prefix without its trailing "/"

    def child(self, name: str) -> S3Location:
        return S3Location(self.bucket, f"{self.key}/{name}" if self.key else name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ListedObject:
    """One listed object: the ETag pins the version every later request of it reads."""

    name: str  # relative to the model's prefix
    location: S3Location
    size: int
    etag: str  # with its quotes, as S3 sends it
    last_modified: datetime

    @property
    def key(self) -> str:
        """The blob key: the same content (ETag and size) anywhere is one blob."""
        return hashlib.sha256(f"{self.etag}\0{self.size}".encode()).hexdigest()[:40]


def parse_uri(uri: str | os.PathLike[str]) -> S3Location | Path:
    """`s3://bucket/key` as a location; `file://` URIs and plain paths as a `Path`."""
    text = os.fspath(uri)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(text, "no bucket in the URI; write s3://BUCKET/PREFIX", retryable=False)
        return S3Location(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(text, "file:// URIs must name a local path (file:///abs/path)", retryable=False)
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise StoreError(
            text, f"unsupported URI scheme {parsed.scheme!r}; use s3://, file:// or a path", retryable=False
        )
    return Path(text).expanduser()
