"""Experts kept resident in memory by a process that merges trial after trial (an engine's worker).

The experts do not change from trial to trial; only a merge's coefficients do. A worker that runs many
trials reads the base and the experts from the node cache once and keeps their tensors, as they are in
the checkpoints (same dtype, so the engine upcasts the same bits chunk by chunk and every merge is
bit-identical to one read from the files; a float32 task vector would double the memory, a rounded one
would change the numbers). Each later trial merges from memory.

Where they live is chosen by the memory free when they are first needed, and said in the log: the GPU's
memory when the merge runs on a GPU with room for them beside the engine, else host memory when the
host (and the container's memory limit) has room, else nowhere: the trial streams them from the node
cache's files, as a trial without a resident worker does. A margin is left free in either memory for
the merge's own working set (a few chunks and one merged tensor).

`merge_into` is what an engine that merges in place runs in the process that owns its model (vLLM's
worker, the hf engine host): the merge from `RESIDENT`, this process's experts, handed tensor by tensor
to the engine's own loading.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..plan.ir import MergePlan
from .engine import merged_tensors, open_checkpoints
from .io import TensorReader
from .methods.selection import RankedMagnitudes

# Left free beside resident experts: the merge's working set, the engine's growth, the rest of the process.
MARGIN_FRACTION = 0.1
MARGIN_BYTES = 1 << 30

Where = Literal["cuda", "cpu", "files"]


@dataclass(frozen=True)
class Placement:
    where: Where  # files: not resident, read from the node cache every trial
    reason: str


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> int | None:
    """What the container may still allocate under its memory limit (cgroup v2), or None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - current


def host_memory_free() -> int:
    """Bytes this process may still allocate on the host: the least of what the kernel says is available and
    what the container's limit leaves (0 when neither can be read: then nothing is kept resident)."""
    known = [b for b in (_meminfo_available(), _cgroup_headroom()) if b is not None]
    return min(known) if known else 0


def _usable(free: int) -> int:
    return max(0, free - max(MARGIN_BYTES, int(free * MARGIN_FRACTION)))


def choose_placement(needed: int, *, device: torch.device, limit_bytes: int | None) -> Placement:
    """Where `needed` bytes of experts go for merges computed on `device` (see the module's doc);
    `limit_bytes` caps them (the `resident_gib` setting; 0: never resident)."""
    gib = needed / (1 << 30)
    if limit_bytes is not None and needed > limit_bytes:
        return Placement(
            "files", f"the experts need {gib:.2f} GiB, more than resident_gib ({limit_bytes / (1 << 30):.2f})"
        )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if needed <= _usable(free):
            return Placement("cuda", f"the experts need {gib:.2f} GiB and {device} has {free / (1 << 30):.2f} GiB free")
    host = host_memory_free()
    if needed <= _usable(host):
        return Placement("cpu", f"the experts need {gib:.2f} GiB and the host has {host / (1 << 30):.2f} GiB available")
    return Placement(
        "files", f"the experts need {gib:.2f} GiB but the host has {host / (1 << 30):.2f} GiB available (less a margin)"
    )


def _file_identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


class ResidentModels:
    """The tensors of the checkpoints one process merges from, kept in memory across trials: a `TensorSource`.

    `make_resident(checkpoints, ...)` before each merge: loads what is missing (dropping models the current
    merge does not use when all would not fit), or says why the merge must read the files instead."""

    def __init__(self) -> None:
        self._tensors: dict[tuple[Path, str], torch.Tensor] = {}  # (file, tensor name) -> flat tensor
        self._files: dict[Path, tuple[str, int, int]] = {}  # what each file was when it was read
        self._ranked: dict[tuple[tuple[Path, str], tuple[Path, str]], RankedMagnitudes] = {}
        self._placement: Placement | None = None
        self._limit: int | None = None
        self._device = torch.device("cpu")  # where the merges compute

    @property
    def nbytes(self) -> int:
        """What the experts and their sorted task vectors take."""
        held = sum(t.numel() * t.element_size() for t in self._tensors.values())
        return held + sum(r.nbytes for r in self._ranked.values())

    def make_resident(
        self, checkpoints: Mapping[str, Checkpoint], *, device: torch.device, limit_bytes: int | None
    ) -> Placement:
        """Hold every tensor of `checkpoints` in memory if they fit (see `choose_placement`); the placement."""
        self._limit, self._device = limit_bytes, device
        wanted = [info for checkpoint in checkpoints.values() for info in checkpoint.tensors.values()]
        files = {info.file: _file_identity(info.file) for info in wanted}  # one stat per file, not per tensor
        missing = [
            info
            for info in wanted
            if (info.file, info.name) not in self._tensors or self._files.get(info.file) != files[info.file]
        ]
        within_limit = limit_bytes is None or self.nbytes <= limit_bytes
        if not missing and within_limit and self._placement is not None and self._placement.where != "files":
            return self._placement
        wanted_keys = {(info.file, info.name) for info in wanted}
        needed = sum(info.nbytes for info in wanted)
        kept_elsewhere = self.nbytes - sum(
            t.numel() * t.element_size() for key, t in self._tensors.items() if key in wanted_keys
        )
        # Room for everything at once if it fits; else only the models of this merge.
        placement = choose_placement(needed + kept_elsewhere, device=device, limit_bytes=limit_bytes)
        if placement.where == "files" or (self._placement and placement.where != self._placement.where):
            self.clear()
            placement = choose_placement(needed, device=device, limit_bytes=limit_bytes)
            if placement.where == "files":
                self._placement = placement
                return placement
            missing = wanted
        target = torch.device("cuda", device.index) if placement.where == "cuda" else torch.device("cpu")
        with TensorReader() as reader:
            for info in missing:
                tensor = reader.read(info, 0, math.prod(info.shape)).to(target)
                if target.type == "cpu" and device.type == "cuda":  # page-locked: copies to the GPU at full speed
                    tensor = tensor.pin_memory()
                self._tensors[(info.file, info.name)] = tensor
                self._files[info.file] = files[info.file]
        reread = {(info.file, info.name) for info in missing}
        self._ranked = {key: r for key, r in self._ranked.items() if not reread & set(key)}
        self._placement = placement
        print(
            f"resident experts: {len(missing)} tensors read into {target} ({placement.reason}); "
            f"{self.nbytes / (1 << 30):.2f} GiB held",
            file=sys.stderr,
            flush=True,
        )
        return placement

    def read(self, info: TensorInfo, start: int = 0, end: int | None = None) -> torch.Tensor:
        flat = self._tensors[(info.file, info.name)]
        return flat[start : flat.numel() if end is None else end]

    def ranked_magnitudes(self, source: TensorInfo, base: TensorInfo) -> RankedMagnitudes | None:
        """The task vector `source` - `base`'s magnitudes, sorted on first use (TIES then looks its thresholds
        up; a sort costs about three selections), while memory allows: 2 bytes per entry, within the
        placement's limit and margin; None when it does not."""
        key = ((source.file, source.name), (base.file, base.name))
        if key in self._ranked:
            return self._ranked[key]
        if not (key[0] in self._tensors and key[1] in self._tensors):
            return None
        size = 2 * math.prod(source.shape)
        flat = self._tensors[key[0]]
        free = torch.cuda.mem_get_info(flat.device)[0] if flat.device.type == "cuda" else host_memory_free()
        within_limit = self._limit is None or self.nbytes + size <= self._limit
        if not within_limit or size > _usable(free):
            return None
        base = self._tensors[key[1]]
        try:  # sorted where the merges compute (a GPU sorts in milliseconds), kept beside the experts
            magnitudes = (flat.to(self._device).float() - base.to(self._device).float()).abs_()  # as chunks do
            self._ranked[key] = RankedMagnitudes(magnitudes).to(flat.device)
        except torch.OutOfMemoryError:  # the device is full (an engine's KV cache): select per trial instead
            return None
        return self._ranked[key]

    def clear(self) -> None:
        self._tensors.clear()
        self._ranked.clear()
        self._files.clear()
        self._placement = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# The experts of this process: it owns the engine's model, and keeps them across the engine's merges.
RESIDENT = ResidentModels()


def merge_into(
    load: Callable[[Iterator[tuple[str, torch.Tensor]]], None],
    plan: MergePlan,
    model_dirs: Mapping[str, Path | str],
    *,
    device: str,
    limit_bytes: int | None,
) -> dict[str, Any]:
    """Merge `plan` from the resident experts (or from the files, when they do not fit) and hand the merged
    tensors, one at a time as they are computed, to `load` (an engine's loading from an iterator). The
    report: where the experts are held and why, and the seconds spent making them resident, computing the
    merge and loading it."""
    started = time.perf_counter()
    checkpoints = open_checkpoints(plan, model_dirs)
    compute = torch.device(device)
    placement = RESIDENT.make_resident(checkpoints, device=compute, limit_bytes=limit_bytes)
    resident_seconds = time.perf_counter() - started
    merging = 0.0  # of the load's time, what computing the merged tensors took

    def timed(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal merging
        while True:
            began = time.perf_counter()
            item = next(tensors, None)
            merging += time.perf_counter() - began
            if item is None:
                return
            yield item

    with TensorReader() as reader:
        source = reader if placement.where == "files" else RESIDENT
        loading = time.perf_counter()
        load(timed(merged_tensors(plan, checkpoints, source, device=compute)))
        loaded = time.perf_counter() - loading
    return {
        "where": placement.where,
        "reason": placement.reason,
        "resident_seconds": round(resident_seconds, 3),
        "merge_seconds": round(merging, 3),
        "load_seconds": round(loaded - merging, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
