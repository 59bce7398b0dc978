"""What each merge method is, declared once and without torch.

The operator validates plans (and the search spaces build them) in an image that has no torch, so the
whole declaration of a method lives here: its parameters, whether it needs a base model, how many
sources it takes, how the LFS space searches it (`Searched` on each searched parameter; `in_default_space`)
and whether mergekit reproduces it (`mergekit_exact`, for export). The manifest's list of methods, the
LFS space and the exporter all read it; the tensor kernels in `mergesearch_trial_runner.merge.methods`
implement exactly these names, and a test keeps the two registries in step. Adding a method: declare it
here, write its kernel, list the kernel.

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
class Searched:
    """How the LFS space searches a parameter, per layer group and tensor group: a range (floats) or
    choices (booleans); once per expert or one value shared by the experts."""

    low: float = 0.0
    high: float = 1.0
    choices: tuple[bool, ...] = ()
    per_source: bool = False


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    name: str
    scope: ParamScope
    kind: Literal["float", "bool"] = "float"
    default: float | bool | None = None  # None: required
    minimum: float | None = None
    maximum: float | None = None
    search: Searched | None = None  # None: the search leaves it at its default
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
    searchable: bool = False  # a method an LFS layer group may pick
    in_default_space: bool = False  # picked from when a manifest lists no methods
    mergekit_exact: bool = True  # mergekit 0.1.5 computes the same tensors (exported recipes)
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

    @property
    def searched_params(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.search is not None)


_WEIGHT = ParamSpec(
    name="weight",
    scope=ParamScope.SOURCE,
    search=Searched(low=0.0, high=1.0, per_source=True),
    doc="coefficient of this source",
)
_DENSITY = ParamSpec(
    name="density",
    scope=ParamScope.SOURCE,
    default=1.0,
    minimum=0.0,
    maximum=1.0,
    search=Searched(low=0.1, high=1.0),
    doc="fraction of the task vector's entries kept",
)


def _lambda(search: Searched | None = None) -> ParamSpec:
    return ParamSpec(
        name="lambda", scope=ParamScope.SHARED, default=1.0, search=search, doc="scale of the merged task vector"
    )


def _normalize(default: bool, search: Searched | None = None) -> ParamSpec:
    return ParamSpec(
        name="normalize",
        scope=ParamScope.SHARED,
        kind="bool",
        default=default,
        search=search,
        doc="divide by the sum of the (kept) weights",
    )


def _rescale() -> ParamSpec:
    return ParamSpec(
        name="rescale",
        scope=ParamScope.SHARED,
        kind="bool",
        default=True,
        doc="divide kept entries by density (DARE's 1/(1-p))",
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="linear",
            needs_base=False,
            params=(_WEIGHT, _normalize(True)),
            searchable=True,
            in_default_space=True,
            doc="weighted average of the sources",
            reference="https://arxiv.org/abs/2203.05482",
        ),
        MethodSpec(
            name="task_arithmetic",
            needs_base=True,
            # A scale per group, as in the paper: weights in [0, 1] alone make summed task vectors one
            # corner of the cube, and on real LLMs the sum is often where the good merges are.
            params=(_WEIGHT, _lambda(Searched(low=0.5, high=2.0)), _normalize(False)),
            searchable=True,
            in_default_space=True,
            doc="base + lambda * sum(weight * (source - base))",
            reference="https://arxiv.org/abs/2212.04089",
        ),
        MethodSpec(
            name="ties",
            needs_base=True,
            # Normalised (mergekit's default) or summed: summed TIES is among the best hand recipes on LLMs.
            params=(
                _WEIGHT,
                _DENSITY,
                _lambda(Searched(low=0.5, high=1.5)),
                _normalize(True, Searched(choices=(True, False))),
            ),
            searchable=True,
            in_default_space=True,
            doc="trim task vectors by magnitude, elect a sign per entry, average the agreeing entries",
            reference="https://arxiv.org/abs/2306.01708",
        ),
        MethodSpec(
            name="dare_linear",
            needs_base=True,
            params=(_WEIGHT, _DENSITY, _lambda(), _normalize(False), _rescale()),
            searchable=True,
            mergekit_exact=False,  # mergekit draws another random drop and rescales to the L1 norm
            doc="drop task-vector entries at random (seeded), rescale, add",
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MethodSpec(
            name="dare_ties",
            needs_base=True,
            params=(_WEIGHT, _DENSITY, _lambda(), _normalize(False), _rescale()),
            searchable=True,
            in_default_space=True,
            mergekit_exact=False,
            doc="DARE's random drop followed by TIES's sign election",
            reference="https://arxiv.org/abs/2311.03099",
        ),
        MethodSpec(
            name="slerp",
            needs_base=True,
            min_sources=1,
            max_sources=1,
            # The LFS space also picks which pair to interpolate (the base or an expert, and an expert).
            params=(
                ParamSpec(name="t", scope=ParamScope.SHARED, search=Searched(), doc="0 gives the base, 1 the source"),
            ),
            searchable=True,
            in_default_space=True,
            doc="spherical interpolation between the base and one source (lerp when nearly parallel)",
            reference="https://en.wikipedia.org/wiki/Slerp",
        ),
        MethodSpec(
            name="passthrough",
            needs_base=False,
            min_sources=1,
            max_sources=1,
            params=(ParamSpec(name="scale", scope=ParamScope.SOURCE, default=1.0, doc="multiplies every tensor"),),
            doc="copy one source's tensors, optionally scaled (DIS stacks layers with it)",
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown merge method {name!r}; use one of: {known}") from None


def searchable_methods() -> tuple[str, ...]:
    return tuple(name for name, spec in METHODS.items() if spec.searchable)


def default_space_methods() -> list[str]:
    return [name for name, spec in METHODS.items() if spec.in_default_space]
