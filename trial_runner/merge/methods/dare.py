"""DARE (Yu et al.): drop task-vector entries at random, rescale the rest; linear or with TIES's sign election.

The drop is seeded from the plan's seed, the tensor and the chunk, so one plan always gives the same bits
on one kind of device.
"""

from __future__ import annotations

from ...plan.methods import METHODS
from .task_vectors import TaskVectorKernel


class DareLinear(TaskVectorKernel):
    spec = METHODS["dare_linear"]
    sparsify = "drop"


class DareTies(TaskVectorKernel):
    spec = METHODS["dare_ties"]
    sparsify = "drop"
    elect_sign = True
