"""Tensor-at-a-time reading and writing of safetensors checkpoints.

Reading uses `preadv` into a buffer we own rather than the safetensors library's memory map: a mapped
file's touched pages count towards the process's resident memory until unmapped, which would make the
engine's peak memory grow with the model instead of staying at a few tensors.

Writing streams too. The safetensors header lists every tensor's byte range, and the tensor plan knows
every output's shape and dtype before the first is computed, so each shard's header is written first
and the tensors follow as they are merged; nothing waits in memory for a shard to fill. Files get
temporary names and are renamed at the end, index last, so a half-written directory never looks like a
loadable checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import DTYPE_SIZES, SAFETENSORS_INDEX, TensorInfo
from .methods.selection import RankedMagnitudes

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_MAX_IO = 1 << 30  # Linux transfers at most ~2 GiB per call


class TensorReader:
    """Reads tensors, or flat ranges of their elements, by `TensorInfo`. One descriptor per file; not thread-safe."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read_bytes(self, info: TensorInfo, start: int = 0, end: int | None = None) -> memoryview:
        """Bytes `[start, end)` of the tensor's data (all of it by default)."""
        end = info.nbytes if end is None else end
        buffer = bytearray(end - start)
        view = memoryview(buffer)
        fd = self._fd(info.file)
        done = 0
        while done < len(buffer):
            count = os.preadv(fd, [view[done : done + _MAX_IO]], info.start + start + done)
            if count == 0:
                raise OSError(f"{info.file}: unexpected end of file while reading {info.name}")
            done += count
        return view

    def read(self, info: TensorInfo, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements `[start, end)` of the flattened tensor (all of it, in its shape, by default)."""
        dtype = TORCH_DTYPES[info.dtype]
        size = DTYPE_SIZES[info.dtype]
        whole = start == 0 and end is None
        numel = math.prod(info.shape)
        end = numel if end is None else end
        if end == start:
            flat = torch.empty(0, dtype=dtype)
        else:
            flat = torch.frombuffer(self.read_bytes(info, start * size, end * size), dtype=dtype)
        return flat.reshape(info.shape) if whole else flat

    def ranked_magnitudes(self, source: TensorInfo, base: TensorInfo) -> RankedMagnitudes | None:
        """None: the files keep no sorted task vectors (a TIES selection makes its passes)."""
        return None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def _shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header(shard: Sequence[OutputTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard:
        entries[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(header)) + header


class StreamingCheckpointWriter:
    """Writes tensors, in the declared order, into sharded safetensors files with an index.

    Usage: `with StreamingCheckpointWriter(out_dir, outputs) as w: w.write(name, chunks)...`; the
    files appear under their final names only when every declared tensor was written and the context
    exits without an error.
    """

    def __init__(self, out_dir: Path, tensors: Sequence[OutputTensor], *, max_shard_bytes: int = 2 << 30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shards = _shards(tensors, max_shard_bytes)
        count = len(self._shards)
        self._names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._order = [(shard_index, t) for shard_index, shard in enumerate(self._shards) for t in shard]
        self._next = 0
        self._handle = None
        self._shard = -1
        self.bytes_written = 0

    def _tmp(self, name: str) -> Path:
        return self.out_dir / f".{name}.partial-{os.getpid()}"

    def write(self, name: str, chunks: Iterable[torch.Tensor | memoryview]) -> None:
        """Write the declared next tensor from its flat chunks (tensors of its dtype, or raw bytes), in order."""
        shard_index, expected = self._order[self._next]
        if name != expected.name:
            raise RuntimeError(f"tensor {name} written out of order; expected {expected.name}")
        if shard_index != self._shard:
            if self._handle is not None:
                self._handle.close()
            self._shard = shard_index
            self._handle = self._tmp(self._names[shard_index]).open("wb")
            self._handle.write(_header(self._shards[shard_index]))
        assert self._handle is not None
        written = 0
        for chunk in chunks:
            if isinstance(chunk, torch.Tensor):
                if SAFETENSORS_NAMES[chunk.dtype] != expected.dtype:
                    raise RuntimeError(
                        f"tensor {name}: chunk is {SAFETENSORS_NAMES[chunk.dtype]}, declared {expected.dtype}"
                    )
                chunk = memoryview(chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
            self._handle.write(chunk)
            written += chunk.nbytes
        if written != expected.nbytes:
            raise RuntimeError(f"tensor {name}: wrote {written} bytes, declared {expected.nbytes}")
        self.bytes_written += written
        self._next += 1

    def _finish(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"only {self._next} of {len(self._order)} declared tensors were written")
        if self._handle is not None:
            self._handle.close()
        weight_map = {t.name: self._names[i] for i, t in self._order}
        total = sum(t.nbytes for _, t in self._order)
        for name in self._names:
            self._tmp(name).replace(self.out_dir / name)
        index_tmp = self._tmp(SAFETENSORS_INDEX)
        index_tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        index_tmp.replace(self.out_dir / SAFETENSORS_INDEX)

    def _abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
        for name in self._names:
            self._tmp(name).unlink(missing_ok=True)

    def __enter__(self) -> StreamingCheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self._finish()
        else:
            self._abort()
