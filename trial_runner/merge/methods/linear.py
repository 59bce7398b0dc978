"""Linear: a weighted average of the sources (Wortsman et al., model soups)."""

from __future__ import annotations

from typing import Any

import torch

from ...plan.methods import METHODS
from .base import Chunk, MergeKernel, Params


class Linear(MergeKernel):
    spec = METHODS["linear"]

    def merge(self, chunk: Chunk, params: Params, statistics: Any, generator: torch.Generator) -> torch.Tensor:
        weights = [params.source(i, "weight") for i in range(len(chunk.sources))]
        result = torch.zeros_like(chunk.sources[0])
        for tensor, weight in zip(chunk.sources, weights, strict=True):
            result.add_(tensor, alpha=weight)
        if params.shared["normalize"]:
            result.div_(sum(weights))
        return result
