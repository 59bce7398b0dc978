"""TIES-merging (Yadav et al.): trim each task vector to its largest entries, elect a sign, disjoint mean."""

from __future__ import annotations

from ...plan.methods import METHODS
from .task_vectors import TaskVectorKernel


class Ties(TaskVectorKernel):
    spec = METHODS["ties"]
    sparsify = "trim"
    elect_sign = True
