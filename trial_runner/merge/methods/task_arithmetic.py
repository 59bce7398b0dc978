"""Task arithmetic (Ilharco et al.): base + lambda * sum(weight_i * (source_i - base))."""

from __future__ import annotations

from ...plan.methods import METHODS
from .task_vectors import TaskVectorKernel


class TaskArithmetic(TaskVectorKernel):
    spec = METHODS["task_arithmetic"]
