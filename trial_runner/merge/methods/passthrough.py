"""Passthrough: copy one source's tensor, optionally scaled (how DIS stacks layers)."""

from __future__ import annotations

from typing import Any

import torch

from ...plan.methods import METHODS
from .base import Chunk, MergeKernel, Params


class Passthrough(MergeKernel):
    spec = METHODS["passthrough"]

    def merge(self, chunk: Chunk, params: Params, statistics: Any, generator: torch.Generator) -> torch.Tensor:
        scale = params.source(0, "scale")
        return chunk.sources[0] if scale == 1 else chunk.sources[0] * scale
