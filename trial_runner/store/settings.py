"""How hard the store tries and how much it moves at once."""

from __future__ import annotations

from dataclasses import dataclass


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
