"""Reading a Hugging Face checkpoint's structure without loading a single weight.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
shape and byte range, then the raw bytes. Parsing the header is pure Python, so the operator (which has
no torch) can check that experts and base agree before any trial runs, and the engine can plan every
tensor before reading one. Pickled checkpoints (`*.bin`, `*.pt`) are refused, never opened.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
# torch.save / pickle formats: opening one runs arbitrary code, so they are never read (nor downloaded).
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Files besides config.json and the weights that make a model directory usable: tokenizer, chat template,
# generation defaults. A merge carries them over from its config model.
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

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


def is_pickled(name: str) -> bool:
    """Whether a file name is a pickled weight file (`*.bin`, `*.pt`, ...), which MergeSearch never opens."""
    return name.lower().endswith(PICKLED_SUFFIXES)


def header_length(prefix: bytes, size: int, source: str) -> int:
    """The JSON header length declared by the first 8 bytes of a safetensors file of `size` bytes."""
    if len(prefix) < 8:
        raise CheckpointError(f"{source}: not a safetensors file (only {len(prefix)} bytes)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > _MAX_HEADER_BYTES or 8 + length > size:
        raise CheckpointError(
            f"{source}: corrupt or truncated safetensors header (declares {length} bytes, file has {size})"
        )
    return int(length)


def parse_header(data: bytes, source: str) -> dict[str, Any]:
    """The JSON header itself (the `header_length` bytes after the first 8)."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise CheckpointError(f"{source}: safetensors header is not valid JSON ({exc})") from None


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of one safetensors file and the offset where its data begins."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = header_length(handle.read(8), size, str(path))
        header = parse_header(handle.read(length), str(path))
    return header, 8 + length


def tensor_layout(
    header: dict[str, Any], data_start: int, size: int, source: str
) -> Iterator[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype, shape, start, end) of every tensor in a parsed header, with absolute byte offsets,
    checked against the dtype's size and the file's `size` (a truncated download fails here)."""
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{source}: tensor {name} has unsupported dtype {dtype}")
        expected = DTYPE_SIZES[dtype]
        for dim in shape:
            expected *= dim
        if end - begin != expected:
            raise CheckpointError(
                f"{source}: tensor {name} has {end - begin} bytes but shape {list(shape)} of {dtype} needs {expected}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{source}: truncated: tensor {name} ends at byte {data_start + end} but the file has {size} bytes; "
                "download it again"
            )
        yield name, dtype, shape, data_start + begin, data_start + end


def read_tensor_infos(path: Path) -> dict[str, TensorInfo]:
    header, data_start = read_header(path)
    size = path.stat().st_size
    return {
        name: TensorInfo(name, dtype, shape, path, start, end)
        for name, dtype, shape, start, end in tensor_layout(header, data_start, size, str(path))
    }


def select_weight_files(names: Collection[str], read_index: Callable[[], dict[str, Any]], where: str) -> list[str]:
    """Which of a model directory's file `names` hold its weights: the shards its index names, else the
    single file, else every `*.safetensors`. `read_index` returns the parsed index when there is one.
    Shared by local directories and remote prefixes, so both choose (and refuse) alike."""
    if SAFETENSORS_INDEX in names:
        files = sorted(set(read_index()["weight_map"].values()))
        missing = [name for name in files if name not in names]
        if missing:
            raise CheckpointError(f"{where}: {SAFETENSORS_INDEX} names shards that are missing: {missing}")
        return files
    if SAFETENSORS_SINGLE in names:
        return [SAFETENSORS_SINGLE]
    found = sorted(name for name in names if name.endswith(".safetensors"))
    if found:
        return found
    pickled = sorted(name for name in names if is_pickled(name))
    if pickled:
        raise CheckpointError(
            f"{where}: only pickled weights ({pickled[0]}) found; MergeSearch never unpickles downloaded files. "
            "Convert the model to safetensors first "
            "(e.g. save_pretrained(..., safe_serialization=True) on a trusted machine)"
        )
    raise CheckpointError(
        f"{where}: no safetensors weights found (expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})"
    )


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded through the index, or the single file)."""
    names = {path.name for path in model_dir.iterdir() if path.is_file()}
    read_index = lambda: json.loads((model_dir / SAFETENSORS_INDEX).read_text())  # noqa: E731
    return [model_dir / name for name in select_weight_files(names, read_index, str(model_dir))]


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
