"""SLERP between the base and one source, over each whole tensor, with mergekit's lerp fallback.

The angle is a property of the whole tensor, so it is computed first (norms and dot product accumulated
in float64 over the chunks); every chunk is then the same combination of base and source.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...plan.methods import METHODS
from .base import Chunk, ChunkPass, MagnitudeIndex, MergeKernel, Params

DOT_THRESHOLD = 0.9995  # |cos| above this: the vectors are nearly parallel and slerp is ill-conditioned
NORM_EPS = 1e-8


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float) -> tuple[float, float]:
    """Coefficients (c0, c1) with slerp(v0, v1) = c0 * v0 + c1 * v1, given |v0|, |v1| and v0 . v1."""
    norm0 = norm0 if norm0 > NORM_EPS else 1.0
    norm1 = norm1 if norm1 > NORM_EPS else 1.0
    cosine = max(-1.0, min(1.0, dot / (norm0 * norm1)))
    if abs(cosine) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cosine)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


class Slerp(MergeKernel):
    spec = METHODS["slerp"]

    def statistics(self, chunks: ChunkPass, params: Params, numel: int, *, ranked: MagnitudeIndex | None = None) -> Any:
        squares0 = squares1 = dot = 0.0
        for chunk in chunks():
            assert chunk.base is not None
            v0, v1 = chunk.base.double(), chunk.sources[0].double()
            squares0 += float(v0.square().sum())
            squares1 += float(v1.square().sum())
            dot += float((v0 * v1).sum())
        return slerp_coefficients(float(params.shared["t"]), math.sqrt(squares0), math.sqrt(squares1), dot)

    def merge(self, chunk: Chunk, params: Params, statistics: Any, generator: torch.Generator) -> torch.Tensor:
        assert chunk.base is not None
        coef0, coef1 = statistics
        return chunk.base * coef0 + chunk.sources[0] * coef1
