"""The interface every merge kernel implements.

The engine streams each output tensor through its kernel in chunks (flat ranges of elements), so that
memory stays at a few chunks however large the tensor (a 7B model's embedding is half a GiB in float32).
Most methods are elementwise and only implement `merge`. A method that needs something of the whole
tensor first - TIES's trim threshold, SLERP's angle - computes it in `statistics`, which may walk the
inputs as often as it needs; `merge` then gets the result with every chunk.

Kernels receive float32 chunks (the engine upcasts and later casts to the output dtype) and a generator
seeded from the plan's seed, the tensor and the chunk. They are pure: no I/O, no global state, inputs
never modified.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...plan.ir import Scalar
from ...plan.methods import MethodSpec

if TYPE_CHECKING:
    from .selection import RankedMagnitudes


@dataclass(frozen=True)
class Chunk:
    """The same flat range of elements of the base (if any) and of every source, as float32."""

    base: torch.Tensor | None
    sources: Sequence[torch.Tensor]


@dataclass(frozen=True)
class Params:
    """Parameters resolved for one tensor: shared ones and one mapping per source."""

    shared: Mapping[str, Scalar]
    per_source: Sequence[Mapping[str, Scalar]]

    def source(self, index: int, name: str) -> float:
        return float(self.per_source[index][name])


ChunkPass = Callable[[], Iterator[Chunk]]  # each call walks the tensor's inputs once more
# Source i's task-vector magnitudes, sorted, where the engine's inputs keep them (resident experts); else None.
MagnitudeIndex = Callable[[int], "RankedMagnitudes | None"]


class MergeKernel(ABC):
    spec: ClassVar[MethodSpec]

    def statistics(self, chunks: ChunkPass, params: Params, numel: int, *, ranked: MagnitudeIndex | None = None) -> Any:
        """Whatever `merge` needs to know of the whole tensor (of `numel` elements); by default nothing.
        `ranked` answers selections over task vectors without a pass, where the inputs allow."""
        return None

    @abstractmethod
    def merge(self, chunk: Chunk, params: Params, statistics: Any, generator: torch.Generator) -> torch.Tensor:
        """The merged values of this chunk (float32, the chunk's shape)."""
