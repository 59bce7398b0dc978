"""Process-wide allocator setting for merge processes.

glibc serves large allocations with mmap (returned to the system on free) until a large block is freed;
then it raises its mmap threshold to that block's size and serves later ones from the heap, which it
seldom gives back. A merge allocates and frees tensors of the same few sizes thousands of times, so
after the first layer most of them land on the heap and resident memory creeps up by tens of MiB.
Pinning the threshold keeps every tensor-sized allocation on mmap, at a price in time: each chunk's
pages are faulted in afresh, which makes a CPU merge 2-2.5x slower. `mergesearch merge`, whose promise
is bounded memory, calls this once; the trial runner does not (it holds the merged model in memory or
hands it to an engine anyway, and a trial's fixed cost is what multi-fidelity has to beat). It does
nothing where glibc's mallopt is unavailable.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_the_system() -> bool:
    """Make allocations of 1 MiB or more use mmap for the rest of the process; True if it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
