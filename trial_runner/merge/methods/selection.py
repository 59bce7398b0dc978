"""The k-th largest magnitude of a tensor that is only ever seen in chunks.

TIES keeps each task vector's `k` entries of largest magnitude, a selection over the whole tensor. A
non-negative float32's bit pattern orders like its value, so a radix selection finds the exact k-th
largest in two passes: a 65,536-bin histogram of the top 16 bits names the bin that holds it, and a
histogram of the low 16 bits of that bin's entries names the entry. Memory: the histograms and one
chunk, whatever the tensor's size. It is also faster than a partition of the whole tensor (or of the
boundary bin's entries), which is why one-chunk tensors use it too, except small ones: below
`PARTITION_BELOW` entries, a partition (`torch.kthvalue`) costs less than the histograms' set-up.
A tensor that fits one chunk is read once and its values kept for the second pass.

A worker that keeps experts resident can do better across trials: a task vector's magnitudes do not
change from trial to trial, only the density does, so `RankedMagnitudes` sorts them once and every later
selection is a lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

BINS = 1 << 16
PARTITION_BELOW = 1 << 15


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    return magnitude.contiguous().reshape(-1).view(torch.int32)


def _bin_from_top(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the `rank`-th largest entry, entries in higher bins); rank counts from 1."""
    from_top = torch.flip(histogram, dims=(0,)).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    above = int(from_top[position - 1]) if position > 0 else 0
    return BINS - 1 - position, above


def kth_largest_magnitudes(passes: Callable[[], Iterator[Sequence[torch.Tensor]]], ranks: Sequence[int]) -> list[float]:
    """For each i, the `ranks[i]`-th largest value (1-based) among every chunk's `values[i]` (non-negative).

    `passes()` yields, per chunk, one non-negative float32 tensor per selection; it is called at most twice.
    """
    first = _only_chunk(passes)
    if first is None:
        return _radix_select(passes, ranks)
    small = [i for i, values in enumerate(first) if values.numel() < PARTITION_BELOW]
    found = {i: float(torch.kthvalue(first[i].reshape(-1), first[i].numel() - ranks[i] + 1).values) for i in small}
    large = [i for i in range(len(ranks)) if i not in found]
    if large:
        selected = _radix_select(lambda: iter([[first[i] for i in large]]), [ranks[i] for i in large])
        found |= dict(zip(large, selected, strict=True))
    return [found[i] for i in range(len(ranks))]


def _only_chunk(passes: Callable[[], Iterator[Sequence[torch.Tensor]]]) -> Sequence[torch.Tensor] | None:
    """The values of the only chunk, or None when there are several (then none of them stays in memory)."""
    chunks = passes()
    first = next(chunks)
    return first if next(chunks, None) is None else None


def _radix_select(passes: Callable[[], Iterator[Sequence[torch.Tensor]]], ranks: Sequence[int]) -> list[float]:
    count = len(ranks)
    high = [torch.zeros(BINS, dtype=torch.int64) for _ in range(count)]
    for values in passes():
        for i in range(count):
            high[i] += torch.bincount(_bits(values[i]) >> 16, minlength=BINS).cpu()
    bins, remaining = [], []
    for i in range(count):
        bin_index, above = _bin_from_top(high[i], ranks[i])
        bins.append(bin_index)
        remaining.append(ranks[i] - above)

    low = [torch.zeros(BINS, dtype=torch.int64) for _ in range(count)]
    for values in passes():
        for i in range(count):
            bits = _bits(values[i])
            low[i] += torch.bincount(bits[(bits >> 16) == bins[i]] & 0xFFFF, minlength=BINS).cpu()
    thresholds = []
    for i in range(count):
        low_bits, _ = _bin_from_top(low[i], remaining[i])
        pattern = torch.tensor([(bins[i] << 16) | low_bits], dtype=torch.int32)
        thresholds.append(float(pattern.view(torch.float32)))
    return thresholds


class RankedMagnitudes:
    """The magnitudes of one flat float32 tensor, sorted once, in about 2 bytes per entry: the k-th largest
    of any rank is then a lookup, and the same value `kth_largest_magnitudes` selects.

    Stored as the sorted bit patterns' low 16 bits, and the distinct high 16 bits with where each one's run
    ends in the sorted order (8 bytes each; a task vector's magnitudes span a few thousand)."""

    def __init__(self, magnitudes: torch.Tensor) -> None:
        ordered = torch.sort(_bits(magnitudes)).values  # non-negative floats' bits sort like the floats
        self.numel = ordered.numel()
        highs, counts = torch.unique_consecutive(ordered >> 16, return_counts=True)
        self.highs = highs.to(torch.int32)
        self.run_ends = counts.cumsum(0).to(torch.int32)
        self.low = (ordered & 0xFFFF).to(torch.int16)  # wraps above 0x7FFF; masked back on lookup

    @property
    def nbytes(self) -> int:
        return self.low.numel() * 2 + (self.highs.numel() + self.run_ends.numel()) * 4

    def to(self, device: torch.device) -> RankedMagnitudes:
        """Move the index to `device` (in place); itself."""
        self.highs, self.run_ends, self.low = self.highs.to(device), self.run_ends.to(device), self.low.to(device)
        return self

    def kth_largest(self, rank: int) -> float:
        """The `rank`-th largest magnitude (1-based)."""
        position = self.numel - rank  # in ascending order
        run = int(torch.searchsorted(self.run_ends, torch.tensor(position, dtype=torch.int32), right=True))
        pattern = torch.tensor([(int(self.highs[run]) << 16) | (int(self.low[position]) & 0xFFFF)], dtype=torch.int32)
        return float(pattern.view(torch.float32))
