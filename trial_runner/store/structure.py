"""What makes a model, and its structure read remotely: which objects under a prefix are the model (weights
chosen and refused exactly as `Checkpoint.open` chooses them), and its config.json and every tensor's header,
read with ranged GETs so the operator validates plans against models it never downloads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import (
    SAFETENSORS_INDEX,
    Checkpoint,
    CheckpointError,
    header_length,
    is_pickled,
    parse_header,
    select_weight_files,
    tensor_layout,
)
from .errors import StoreError
from .transfer import list_objects, read_range
from .uris import ListedObject, S3Location

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
_HEADER_PROBE = 1 << 16  # first ranged GET of a safetensors file; enough for the headers of most shards
# Weights in other frameworks' formats: never needed to load a safetensors checkpoint, often large.
_FOREIGN_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf", ".onnx", ".tflite", ".ot")


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


def open_checkpoint(path: Path, uri: str) -> Checkpoint:
    """The checkpoint in the local directory `path`; a `StoreError` naming `uri` if it is none."""
    if not path.is_dir():
        raise StoreError(uri, "no such directory", retryable=False)
    try:
        return Checkpoint.open(path)
    except CheckpointError as exc:  # name the URI, not the directory it was downloaded into
        message = str(exc).replace(str(path), uri).removeprefix(f"{uri}: ")
        raise StoreError(uri, message, retryable=False) from None
    except (OSError, ValueError) as exc:
        raise StoreError(uri, f"not a readable model directory: {exc}", retryable=False) from None


def model_files(
    client: Any, prefix: S3Location, read: Callable[[ListedObject], bytes]
) -> tuple[dict[str, ListedObject], list[str]]:
    """The objects that make the model (its weights as `Checkpoint.open` would choose them, and every other
    file but pickled and foreign weights) and the weight files' names, in `Checkpoint.open`'s order.
    `read` reads a small object (the index). Refuses (not retryable) a prefix that is not a model."""
    uri = str(prefix)
    listed = {obj.name: obj for obj in list_objects(client, prefix)}
    if not listed:
        raise StoreError(uri, "no objects under this prefix; check the bucket and the model's path", retryable=False)
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


def remote_structure(client: Any, prefix: S3Location) -> RemoteCheckpoint:
    """config.json and every tensor's dtype, shape and byte range of the model under `prefix`, a few ranged
    GETs per safetensors file."""
    uri = str(prefix)
    objects, names = model_files(client, prefix, lambda obj: read_range(client, obj))
    config = _json_object(read_range(client, objects[CONFIG_FILE]), f"{uri}/{CONFIG_FILE}")
    tensors: dict[str, RemoteTensor] = {}
    for name in names:
        obj = objects[name]
        source = str(obj.location)
        try:
            probe = read_range(client, obj, 0, min(_HEADER_PROBE, obj.size))
            length = header_length(probe, obj.size, source)
            raw = probe[8 : 8 + length]
            if len(raw) < length:
                raw += read_range(client, obj, len(probe), 8 + length)
            header = parse_header(raw, source)
            layout = list(tensor_layout(header, 8 + length, obj.size, source))
        except CheckpointError as exc:
            raise StoreError(source, str(exc).removeprefix(f"{source}: "), retryable=False) from None
        for tensor, dtype, shape, start, end in layout:
            if tensor in tensors:
                raise StoreError(uri, f"tensor {tensor} appears in two shards", retryable=False)
            tensors[tensor] = RemoteTensor(tensor, dtype, shape, source, start, end)
    return RemoteCheckpoint(uri, config, tensors)


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
