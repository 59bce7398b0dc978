"""What each merge method accepts, declared without torch.

The operator validates plans (and the search spaces build them) in an image that has no torch, so the
declaration of a method - its parameters, whether it needs a base model, how many sources it takes -
lives here, and the tensor kernels in `mergesearch_trial_runner.merge.methods` implement exactly these
names. A test keeps the two registries in step.

Parameter names follow mergekit so that users' recipes carry over.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class ParamScope(StrEnum):
    SHARED = "shared"  # one value for the whole tensor (e.g. TIES's lambda)
    SOURCE = "source"  # one value per non-base source model (e.g. a task vector's weight)


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    name: str
    scope: ParamScope
    kind: Literal["float", "bool"] = "float"
    default: float | bool | None = None  # None: required
    minimum: float | None = None
    maximum: float | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value: object) -> float | bool:
        """Return `value` coerced to this parameter's kind, or raise ValueError saying why not."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"`{self.name}` must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"`{self.name}` must be a number, got {value!r}")
        number = float(value)
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"`{self.name}` is {number}, but must be >= {self.minimum}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"`{self.name}` is {number}, but must be <= {self.maximum}")
        return number


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    name: str
    needs_base: bool
    min_sources: int = 1
    max_sources: int | None = None
    params: tuple[ParamSpec, ...] = ()
    doc: str = ""
    reference: str = ""

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def shared_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope is ParamScope.SHARED)

    @property
    def source_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.scope is ParamScope.SOURCE)


_WEIGHT = ParamSpec(name="weight", scope=ParamScope.SOURCE, doc="coefficient of this source")
_DENSITY = ParamSpec(
    name="density",
    scope=ParamScope.SOURCE,
    default=1.0,
    minimum=0.0,
    maximum=1.0,
    doc="fraction of the task vector's entries kept",
)
_LAMBDA = ParamSpec(name="lambda", scope=ParamScope.SHARED, default=1.0, doc="scale of the merged task vector")


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec(
        name="normalize",
        scope=ParamScope.SHARED,
        kind="bool",
        default=default,
        doc="divide by the sum of the (kept) weights",
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="linear",
            needs_base=False,
            params=(_WEIGHT, _normalize(True)),
            doc="weighted average of the sources",
            reference="https://arxiv.org/abs/2203.05482",
        ),
        MethodSpec(
            name="task_arithmetic",
            needs_base=True,
            params=(_WEIGHT, _LAMBDA, _normalize(False)),
            doc="base + lambda * sum(weight * (source - base))",
            reference="https://arxiv.org/abs/2212.04089",
        ),
        MethodSpec(
            name="ties",
            needs_base=True,
            params=(_WEIGHT, _DENSITY, _LAMBDA, _normalize(True)),
            doc="trim task vectors by magnitude, elect a sign per entry, average the agreeing entries",
            reference="https://arxiv.org/abs/2306.01708",
        ),
        MethodSpec(
            name="dare_linear",
            needs_base=True,
            params=(
                _WEIGHT,
                _DENSITY,
                _LAMBDA,
                _normalize(False),
                ParamSpec(
                    name="rescale",
                    scope=ParamScope.SHARED,
                    kind="bool",
                    default=True,
                    doc="divide kept entries by density (DARE's 1/(1-p))",
                ),
            ),
            doc="drop task-vector entries at random (seeded), rescale, add",
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MethodSpec(
            name="dare_ties",
            needs_base=True,
            params=(
                _WEIGHT,
                _DENSITY,
                _LAMBDA,
                _normalize(False),
                ParamSpec(
                    name="rescale",
                    scope=ParamScope.SHARED,
                    kind="bool",
                    default=True,
                    doc="divide kept entries by density (DARE's 1/(1-p))",
                ),
            ),
            doc="DARE's random drop followed by TIES's sign election",
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MethodSpec(
            name="slerp",
            needs_base=True,
            min_sources=1,
            max_sources=1,
            params=(ParamSpec(name="t", scope=ParamScope.SHARED, doc="0 gives the base, 1 the source"),),
            doc="spherical interpolation between the base and one source (lerp when nearly parallel)",
            reference="https://en.wikipedia.org/wiki/Slerp",
        ),
        MethodSpec(
            name="passthrough",
            needs_base=False,
            min_sources=1,
            max_sources=1,
            params=(ParamSpec(name="scale", scope=ParamScope.SOURCE, default=1.0, doc="multiplies every tensor"),),
            doc="copy one source's tensors, optionally scaled",
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown merge method {name!r}; use one of: {known}") from None
