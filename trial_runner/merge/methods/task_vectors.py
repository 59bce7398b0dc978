"""Task-vector arithmetic shared by task_arithmetic, TIES and the two DARE variants.

Each of those methods forms task vectors (source - base), optionally sparsifies them (TIES keeps the
largest entries by magnitude, DARE drops entries at random), weights them, optionally keeps only the
entries that agree with an elected sign, sums, optionally normalises by the weight that survived, scales
by lambda and adds the result back to the base. The order of these steps and the defaults follow
mergekit's generalized task arithmetic so that recipes carry over; DARE's rescale follows the paper
(divide the kept entries by the keep probability).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .base import Chunk, ChunkPass, MagnitudeIndex, MergeKernel, Params
from .selection import PARTITION_BELOW, kth_largest_magnitudes


def trim_thresholds(
    chunks: ChunkPass, params: Params, sources: int, numel: int, ranked: MagnitudeIndex | None = None
) -> list[float | None]:
    """Per source, the magnitude at or above which TIES keeps an entry (None: keep all)."""
    densities = [params.source(i, "density") for i in range(sources)]
    trimmed = [i for i, d in enumerate(densities) if 0 < d < 1 and numel > 0]
    # mergekit keeps max(1, int(density * n)) entries; density <= 0 keeps none.
    rank = {i: max(1, int(densities[i] * numel)) for i in trimmed}
    found: dict[int, float] = {}
    for i in trimmed:
        index = ranked(i) if ranked is not None and numel >= PARTITION_BELOW else None
        if index is not None:
            found[i] = index.kth_largest(rank[i])
    selected = [i for i in trimmed if i not in found]

    def magnitudes() -> Iterator[Sequence[torch.Tensor]]:
        for chunk in chunks():
            assert chunk.base is not None
            yield [(chunk.sources[i] - chunk.base).abs_() for i in selected]

    if selected:
        found |= dict(zip(selected, kth_largest_magnitudes(magnitudes, [rank[i] for i in selected]), strict=True))
    return [found.get(i, float("inf") if densities[i] <= 0 else None) for i in range(sources)]


# Elements per pass of the arithmetic below. At this size a chunk's dozen temporaries stay in the CPU's
# caches; over a whole chunk (1M elements) every pass goes out to memory, and TIES merged a SmolLM2-sized
# tensor 2-3x slower. Everything here is elementwise, so the bits do not depend on it.
BLOCK_ELEMENTS = 1 << 18


def merge_task_vectors(
    chunk: Chunk,
    params: Params,
    *,
    thresholds: Sequence[float | None] | None = None,
    drop: torch.Generator | None = None,
    elect_sign: bool,
) -> torch.Tensor:
    """One chunk of base + lambda * combine(weight_i * sparsify(source_i - base))."""
    base = chunk.base
    assert base is not None
    count = len(chunk.sources)
    keep: list[torch.Tensor | None] = [None] * count
    if drop is not None:
        # DARE's draws: for the whole chunk, source by source, as the chunk's seed defines them.
        for i in range(count):
            density = params.source(i, "density")
            if density < 1:
                draws = torch.rand(base.shape, generator=drop, device=base.device)
                # 1 where the draw is below the density, else 0 (an arithmetic mask, see below)
                keep[i] = torch.nn.functional.threshold(draws.neg_().add_(density), 0.0, 0.0).sign_()
    # Keep |delta| >= threshold: threshold() keeps what is above the float just below it.
    below = [
        None if t is None else float(torch.nextafter(torch.tensor(t), torch.tensor(-math.inf)))
        for t in (thresholds or [None] * count)
    ]
    if base.numel() <= BLOCK_ELEMENTS:
        return _merge_block(base, chunk.sources, keep, params, below, elect_sign)
    merged = torch.empty_like(base)
    for start in range(0, base.numel(), BLOCK_ELEMENTS):
        block = slice(start, start + BLOCK_ELEMENTS)
        merged[block] = _merge_block(
            base[block],
            [source[block] for source in chunk.sources],
            [None if k is None else k[block] for k in keep],
            params,
            below,
            elect_sign,
        )
    return merged


def _merge_block(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    keep: Sequence[torch.Tensor | None],
    params: Params,
    below: Sequence[float | None],
    elect_sign: bool,
) -> torch.Tensor:
    count = len(sources)
    weights = [params.source(i, "weight") for i in range(count)]
    normalize = bool(params.shared["normalize"])
    deltas = torch.empty((count, *base.shape), dtype=base.dtype, device=base.device)
    for i, source in enumerate(sources):
        delta = torch.sub(source, base, out=deltas[i])
        if below[i] is not None:
            # TIES's trim: hardshrink keeps the entries of magnitude above `below`, i.e. at or above the threshold
            torch.hardshrink(delta, below[i], out=delta)
        if keep[i] is not None:
            delta.mul_(keep[i])
            density = params.source(i, "density")
            if params.shared["rescale"] and density > 0:
                delta.div_(density)
        delta.mul_(weights[i])

    if elect_sign:
        # TIES's sign election by total mass (ties go to +; a sum of -0.0 means every delta is zero,
        # and then nothing agrees either way). An entry agrees when it has the elected sign; zeros never
        # agree. With m = +-1 the elected sign, the agreeing mass is m * sum_i max(m * delta_i, 0).
        # Arithmetic masks: every mask in this function is built from copysign, hardshrink, sign and
        # clamps, never from a comparison. On CPU a comparison, or a multiply by the boolean tensor it
        # makes, costs 10-30x a float op. The results are the same bit for bit (tests/merge/test_methods.py);
        # what it saved is in docs/merging.md.
        total = _sum_rows(deltas)
        elected = torch.copysign(torch.ones((), dtype=base.dtype, device=base.device), total, out=total)
        aligned = deltas.mul_(elected).clamp_min_(0)  # every source at once: fewer, longer passes
        mixed = _sum_rows(aligned)
        if normalize:
            mixed.div_(_agreeing_weight(aligned, weights))
    else:
        elected = None
        mixed = _sum_rows(deltas)
        if normalize:
            summed = sum(weights)
            mixed.div_(torch.tensor(summed if abs(summed) >= 1e-8 else 1.0, dtype=base.dtype, device=base.device))
    del deltas

    if float(params.shared["lambda"]) != 1:
        mixed.mul_(float(params.shared["lambda"]))
    if elected is None:
        return mixed.add_(base)
    # m * x is exact for m = +-1 and rounding is symmetric in sign, so applying m last gives the same
    # bits as applying it to the sum, and one pass (base + m * x) does it with the base's add.
    return torch.addcmul(base, elected, mixed)


def _agreeing_weight(aligned: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Per entry, the total weight of the sources that agree (`aligned` > 0); where none does, where the
    agreeing mass is zero too, a nonzero stand-in that keeps it zero. `aligned` is overwritten."""
    agrees = torch.sign(aligned, out=aligned)
    divisor = agrees[0].mul_(weights[0])
    for i in range(1, len(weights)):
        divisor.add_(agrees[i], alpha=weights[i])
    if all(w >= 0 for w in weights):
        # No negative weight: a nonzero total is at least the least positive weight, so raising the
        # totals to it leaves them alone and turns only the zeros (where the mass, too, is zero) into a
        # divisor that keeps that zero: one pass instead of four.
        return divisor.clamp_min_(min((w for w in weights if w > 0), default=1.0))
    return divisor.add_(1 - divisor.sign().abs_())  # 0 -> 1, everything else unchanged


def _sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows[0] + rows[1] + ..., in that order, as a new tensor: on CPU a sum over the first dimension
    took about three times as long as these adds."""
    total = rows[0].clone() if len(rows) == 1 else torch.add(rows[0], rows[1])
    for row in rows[2:]:
        total.add_(row)
    return total


class TaskVectorKernel(MergeKernel):
    """Base for the methods above; subclasses choose sparsification and sign election."""

    sparsify: str | None = None  # "trim" (TIES) or "drop" (DARE)
    elect_sign: bool = False

    def statistics(self, chunks: ChunkPass, params: Params, numel: int, *, ranked: MagnitudeIndex | None = None) -> Any:
        if self.sparsify != "trim":
            return None
        return trim_thresholds(chunks, params, len(params.per_source), numel, ranked)

    def merge(self, chunk: Chunk, params: Params, statistics: Any, generator: torch.Generator) -> torch.Tensor:
        return merge_task_vectors(
            chunk,
            params,
            thresholds=statistics,
            drop=generator if self.sparsify == "drop" else None,
            elect_sign=self.elect_sign,
        )
