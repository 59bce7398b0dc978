"""One kernel per merge method, keyed by the method names declared in `plan.methods`."""

from __future__ import annotations

from .base import Chunk, ChunkPass, MagnitudeIndex, MergeKernel, Params
from .dare import DareLinear, DareTies
from .linear import Linear
from .passthrough import Passthrough
from .slerp import Slerp
from .task_arithmetic import TaskArithmetic
from .ties import Ties

KERNELS: dict[str, MergeKernel] = {
    kernel.spec.name: kernel
    for kernel in (Linear(), TaskArithmetic(), Ties(), DareLinear(), DareTies(), Slerp(), Passthrough())
}

__all__ = ["KERNELS", "Chunk", "ChunkPass", "MagnitudeIndex", "MergeKernel", "Params"]
