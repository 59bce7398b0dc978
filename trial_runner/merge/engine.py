"""The merge engine: execute a lowered plan tensor by tensor, chunk by chunk.

Memory stays at a few chunks whatever the model size. Each output tensor is streamed in flat chunks of
`CHUNK_ELEMENTS`: the same element range of every input is read (with `preadv`, straight from the
files), upcast to float32, merged and cast to the output dtype, then written before the next chunk is
read. Methods that need a whole-tensor statistic first (TIES's trim threshold, SLERP's angle) get extra
passes over the chunks. Layers a plan copies unchanged (DIS passthrough) skip arithmetic and move bytes.

The inputs come from a `TensorSource`: the checkpoint files (`TensorReader`), or tensors a worker keeps
resident in memory (`merge.resident`). `merged_tensors` yields each output whole, one at a time, for an
engine that loads weights from an iterator; whatever the source, the bytes are the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..checkpoint import CARRIED_FILES, DTYPE_SIZES, Checkpoint, TensorInfo
from ..plan.ir import MergePlan, Scalar
from ..plan.tensors import TensorInput, TensorOp, plan_tensors
from .io import TORCH_DTYPES, OutputTensor, StreamingCheckpointWriter, TensorReader
from .methods import KERNELS, Chunk, MagnitudeIndex, Params
from .methods.selection import RankedMagnitudes

PLAN_FILE = "mergesearch_plan.json"
# 4 MiB of float32 per input: large enough that per-chunk overhead vanishes, small enough that a
# TIES of several experts keeps a few tens of MiB live. DARE's random draws depend on it (they are
# seeded per chunk), so changing it changes DARE's bits.
CHUNK_ELEMENTS = 1 << 20

ReadChunk = Callable[[int, int], Chunk]  # (start, end) element range -> the inputs' float32 values there


class TensorSource(Protocol):
    """Where the engine reads its inputs: elements `[start, end)` of a flattened checkpoint tensor, in its
    own dtype (`TensorReader` from the files; `ResidentModels` from memory), and, where it keeps them, a
    task vector's magnitudes sorted (`source` - `base`), which spare TIES its selection passes."""

    def read(self, info: TensorInfo, start: int = 0, end: int | None = None) -> torch.Tensor: ...

    def ranked_magnitudes(self, source: TensorInfo, base: TensorInfo) -> RankedMagnitudes | None: ...


@dataclass(frozen=True)
class MergeStats:
    tensors: int
    bytes_written: int
    raw_copies: int
    seconds: float


def chunk_seed(tensor_seed: int, chunk_index: int) -> int:
    digest = hashlib.blake2b(f"{tensor_seed}:{chunk_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def merge_stream(
    method: str,
    params: Params,
    read: ReadChunk,
    *,
    numel: int,
    seed: int,
    device: torch.device,
    chunk_elements: int = CHUNK_ELEMENTS,
    ranked: MagnitudeIndex | None = None,
) -> Iterator[torch.Tensor]:
    """The merged tensor as float32 flat chunks, in order; `read(start, end)` supplies the inputs (and
    `ranked`, where given, their task vectors' sorted magnitudes)."""
    kernel = KERNELS[method]
    bounds = [(start, min(start + chunk_elements, numel)) for start in range(0, numel, chunk_elements)]

    if len(bounds) == 1:  # most tensors: read once, and let every pass reuse the chunk
        only = read(0, numel)
        reread: ReadChunk = lambda _start, _end: only  # noqa: E731
    else:
        reread = read

    def passes() -> Iterator[Chunk]:
        for start, end in bounds:
            yield reread(start, end)

    statistics = kernel.statistics(passes, params, numel, ranked=ranked)
    for index, (start, end) in enumerate(bounds):
        generator = torch.Generator(device=device).manual_seed(chunk_seed(seed, index))
        yield kernel.merge(reread(start, end), params, statistics, generator)


def merge_tensors(
    method: str,
    *,
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Scalar],
    per_source: Sequence[Mapping[str, Scalar]],
    seed: int = 0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Merge in-memory tensors with the engine's own streaming path (for tests and small tools)."""
    flat_base = None if base is None else base.float().reshape(-1)
    flat_sources = [s.float().reshape(-1) for s in sources]

    def read(start: int, end: int) -> Chunk:
        return Chunk(None if flat_base is None else flat_base[start:end], [s[start:end] for s in flat_sources])

    chunks = merge_stream(
        method,
        Params(shared, per_source),
        read,
        numel=flat_sources[0].numel(),
        seed=seed,
        device=flat_sources[0].device,
        chunk_elements=chunk_elements,
    )
    return torch.cat(list(chunks)).reshape(sources[0].shape)


def open_checkpoints(plan: MergePlan, model_dirs: Mapping[str, Path | str]) -> dict[str, Checkpoint]:
    """Open the checkpoints the plan uses; `model_dirs` maps each model name to a local directory."""
    used = {m for s in plan.slices for m in s.models()} | {plan.config_model}
    missing = sorted(used - set(model_dirs))
    if missing:
        raise ValueError(f"no local directory given for models {missing}")
    return {name: Checkpoint.open(model_dirs[name]) for name in sorted(used)}


class _Executor:
    """Runs tensor ops against opened checkpoints, yielding each output as chunks of its output dtype."""

    def __init__(self, checkpoints: Mapping[str, Checkpoint], source: TensorSource, device: torch.device):
        self.checkpoints, self.source, self.device = checkpoints, source, device

    def is_raw_copy(self, op: TensorOp) -> bool:
        if op.method != "passthrough" or op.scale * float(op.per_source[0]["scale"]) != 1.0:
            return False
        source = op.sources[0]
        return self.checkpoints[source.model].tensors[source.tensor].dtype == op.dtype

    def raw_chunks(self, op: TensorOp, reader: TensorReader) -> Iterator[memoryview]:
        info = self.checkpoints[op.sources[0].model].tensors[op.sources[0].tensor]
        step = CHUNK_ELEMENTS * DTYPE_SIZES[info.dtype]
        for start in range(0, info.nbytes, step):
            yield reader.read_bytes(info, start, min(start + step, info.nbytes))

    def whole(self, op: TensorOp) -> torch.Tensor:
        """The output tensor in its shape: a raw copy is the source's own tensor, unconverted."""
        if self.is_raw_copy(op):
            info = self.checkpoints[op.sources[0].model].tensors[op.sources[0].tensor]
            return self.source.read(info, 0, math.prod(info.shape)).reshape(op.shape)
        chunks = list(self.chunks(op))
        return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).reshape(op.shape)

    def chunks(self, op: TensorOp) -> Iterator[torch.Tensor]:
        def info(tensor: TensorInput) -> TensorInfo:
            return self.checkpoints[tensor.model].tensors[tensor.tensor]

        def load(tensor: TensorInput, start: int, end: int) -> torch.Tensor:
            return self.source.read(info(tensor), start, end).to(device=self.device, dtype=torch.float32)

        def read(start: int, end: int) -> Chunk:
            base = load(op.base, start, end) if op.base else None
            return Chunk(base, [load(s, start, end) for s in op.sources])

        def ranked(index: int) -> RankedMagnitudes | None:
            assert op.base is not None
            return self.source.ranked_magnitudes(info(op.sources[index]), info(op.base))

        out_dtype = TORCH_DTYPES[op.dtype]
        stream = merge_stream(
            op.method,
            Params(op.shared, op.per_source),
            read,
            numel=math.prod(op.shape),
            seed=op.seed,
            device=self.device,
            ranked=ranked if op.base is not None else None,
        )
        for merged in stream:
            yield (merged * op.scale if op.scale != 1.0 else merged).to(out_dtype)


def merge_to_directory(
    plan: MergePlan,
    out_dir: Path | str,
    *,
    model_dirs: Mapping[str, Path | str],
    device: str | torch.device = "cpu",
    max_shard_bytes: int = 2 << 30,
) -> MergeStats:
    """Merge into a Hugging Face model directory: sharded safetensors with index, config, tokenizer, plan."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    checkpoints = open_checkpoints(plan, model_dirs)
    tensor_plan = plan_tensors(plan, checkpoints)
    outputs = [OutputTensor(op.output, op.dtype, op.shape) for op in tensor_plan.ops]
    raw_copies = 0
    with (
        TensorReader() as reader,
        StreamingCheckpointWriter(out_dir, outputs, max_shard_bytes=max_shard_bytes) as writer,
    ):
        executor = _Executor(checkpoints, reader, torch.device(device))
        for op in tensor_plan.ops:
            if executor.is_raw_copy(op):
                writer.write(op.output, executor.raw_chunks(op, reader))
                raw_copies += 1
            else:
                writer.write(op.output, executor.chunks(op))
        written = writer.bytes_written
    write_model_files(out_dir, tensor_plan.config, checkpoints[tensor_plan.config_model].path, plan)
    return MergeStats(len(tensor_plan.ops), written, raw_copies, time.perf_counter() - started)


def merged_tensors(
    plan: MergePlan,
    checkpoints: Mapping[str, Checkpoint],
    source: TensorSource,
    *,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each output tensor (name, tensor in its shape and output dtype), in output order, merged from
    `source`; one at a time, so that at most one merged tensor is alive beyond what the consumer keeps."""
    executor = _Executor(checkpoints, source, torch.device(device))
    for op in plan_tensors(plan, checkpoints).ops:
        yield op.output, executor.whole(op)


def merge_to_state_dict(
    plan: MergePlan, *, model_dirs: Mapping[str, Path | str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Merge into memory: (state dict, output config, directory whose tokenizer the output uses)."""
    checkpoints = open_checkpoints(plan, model_dirs)
    tensor_plan = plan_tensors(plan, checkpoints)
    with TensorReader() as reader:  # every read is a buffer of its own: the state dict owns its tensors
        state = dict(merged_tensors(plan, checkpoints, reader, device=device))
    return state, tensor_plan.config, checkpoints[tensor_plan.config_model].path


def write_model_files(out_dir: Path, config: Mapping[str, Any], tokenizer_dir: Path, plan: MergePlan) -> None:
    """config.json, the tokenizer and generation files of the config model, and the plan as a recipe."""
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in CARRIED_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    (out_dir / PLAN_FILE).write_text(plan.to_json())
