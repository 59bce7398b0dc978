"""The weight store: models and small files from S3, `file://` URIs or plain paths, through a node-wide cache.

Trial pods on one node share one cache directory (a hostPath), so a model is downloaded once per node
however many trials merge it, and the operator reads a remote model's structure (config.json and the
safetensors headers, with ranged GETs) without downloading a weight. This package imports neither torch
nor safetensors: the operator image has neither (import-linter holds that).

    model_store.py   `ModelStore`, the entry point: fetch, read, upload and inspect models by URI, with retries
    settings.py      `StoreSettings`: attempts, timeouts, parallelism, part sizes
    errors.py        `StoreError` and the mapping of boto3, network and disk errors to it (retryable or not)
    uris.py          URI parsing, S3 locations, listed objects and their blob keys
    transfer.py      the S3 client, listing, verified resumable downloads, ranged reads, uploads
    cache.py         the node cache: layout, per-blob locks, commits, snapshots
    structure.py     which objects make a model, and its config and tensor headers read remotely
"""

from .errors import StoreError
from .model_store import ModelStore
from .settings import StoreSettings
from .structure import CONFIG_FILE, RemoteCheckpoint, RemoteTensor

__all__ = ["CONFIG_FILE", "ModelStore", "RemoteCheckpoint", "RemoteTensor", "StoreError", "StoreSettings"]
