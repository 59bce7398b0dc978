"""The merge plan IR and its lowering to tensor operations; pure Python, no torch."""

from .ir import Conditional, LayerSlice, MergePlan, SliceSource
from .methods import METHODS, MethodSpec, ParamScope, ParamSpec, get_method
from .tensors import PlanError, TensorOp, TensorPlan, plan_tensors

__all__ = [
    "METHODS",
    "Conditional",
    "LayerSlice",
    "MergePlan",
    "MethodSpec",
    "ParamScope",
    "ParamSpec",
    "PlanError",
    "SliceSource",
    "TensorOp",
    "TensorPlan",
    "get_method",
    "plan_tensors",
]
