"""Helpers of the weight-store tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path

from mergesearch_trial_runner.store import ModelStore, StoreSettings

# Quick to give up, so failure tests take milliseconds; still more than one attempt, so retries are exercised.
FAST = StoreSettings(attempts=3, backoff_seconds=0.01, request_attempts=2, connect_timeout=2, read_timeout=10)
DTYPE_SIZES = {"F32": 4, "BF16": 2, "F16": 2}


def count_requests(store: ModelStore) -> Counter[str]:
    """A live count of the S3 operations `store` sends (its own client, so other clients do not count)."""
    counts: Counter[str] = Counter()

    def count(model, params, **_: object) -> None:
        counts[model.name] += 1
        if model.name == "GetObject":
            counts[f"GetObject {params['Key'].rsplit('/', 1)[-1]}"] += 1
            if "Range" in params:
                counts[f"Range {params['Key'].rsplit('/', 1)[-1]} {params['Range']}"] += 1

    store.client.meta.events.register("before-parameter-build.s3", count)
    return counts


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None):
    """A valid safetensors file of random bytes, written without torch (for large or odd-headed files)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = DTYPE_SIZES[dtype]
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        remaining = offset
        while remaining:
            step = min(remaining, 1 << 22)
            handle.write(os.urandom(step))
            remaining -= step
    return path


def same_files(a: Path, b: Path) -> bool:
    """Whether two model directories hold the same file names with identical bytes."""
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    return names_a == names_b and all((a / n).read_bytes() == (b / n).read_bytes() for n in names_a)
