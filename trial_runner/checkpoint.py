"""Reading a Hugging Face checkpoint's structure without loading a single weight.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
shape and byte range, then the raw bytes. Parsing the header is pure Python, so the operator (which has
no torch) can check that experts and base agree before any trial runs, and the engine can plan every
tensor before reading one. Pickled checkpoints (`*.bin`, `*.pt`) are refused, never opened.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

# Bytes per element of each safetensors dtype name.
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of one safetensors file and the offset where its data begins."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {len(prefix)} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (declares {header_len} bytes, file has {size})"
            )
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    return header, 8 + header_len


def read_tensor_infos(path: Path) -> dict[str, TensorInfo]:
    header, data_start = read_header(path)
    size = path.stat().st_size
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        expected = DTYPE_SIZES[dtype]
        for dim in shape:
            expected *= dim
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name} has {end - begin} bytes but shape {list(shape)} of {dtype} needs {expected}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} ends at byte {data_start + end} but the file has {size} bytes; "
                "download it again"
            )
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    return infos


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded through the index, or the single file)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{model_dir}: {SAFETENSORS_INDEX} names shards that are missing: {missing}")
        return files
    single = model_dir / SAFETENSORS_SINGLE
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    pickled = [name for name in _PICKLED if (model_dir / name).exists()]
    if pickled:
        raise CheckpointError(
            f"{model_dir}: only pickled weights ({pickled[0]}) found; MergeSearch never unpickles downloaded files. "
            "Convert the model to safetensors first "
            "(e.g. save_pretrained(..., safe_serialization=True) on a trusted machine)"
        )
    raise CheckpointError(
        f"{model_dir}: no safetensors weights found (expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})"
    )


@dataclass(frozen=True)
class Checkpoint:
    """A model directory: its config.json and where every tensor lies."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, model_dir: Path | str) -> Checkpoint:
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.exists():
            raise CheckpointError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
        config = json.loads(config_path.read_text())
        tensors: dict[str, TensorInfo] = {}
        for file in safetensors_files(model_dir):
            for name, info in read_tensor_infos(file).items():
                if name in tensors:
                    raise CheckpointError(f"{model_dir}: tensor {name} appears in two shards")
                tensors[name] = info
        return cls(model_dir, config, tensors)

    @property
    def layer_count_key(self) -> str:
        for key in _LAYER_COUNT_KEYS:
            if key in self.config:
                return key
        raise CheckpointError(f"{self.path}/config.json: no layer count ({' or '.join(_LAYER_COUNT_KEYS)})")

    @property
    def num_layers(self) -> int:
        return int(self.config[self.layer_count_key])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def total_bytes(self, names: Iterable[str] | None = None) -> int:
        return sum(self.tensors[n].nbytes for n in (names if names is not None else self.tensors))
