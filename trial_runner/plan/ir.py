"""The merge plan: the one data structure between the search spaces and the merge engine.

A plan is an ordered list of layer slices. Each slice takes the same number of consecutive layers from
one or more source models (and, for methods that need one, a base model), merges them with one method,
and appends the result to the output model. Method parameters are lists of `{filter, value}` entries:
the first entry whose filter is a substring of the tensor's name wins (no filter, or `*`, matches every
tensor), which is how a value can differ for `self_attn`, `mlp` and the rest - the same rule as
mergekit's conditional parameters.

Everything here is pure data (pydantic, JSON round-trip); no torch. `plan.tensors.plan_tensors` lowers a
plan to one operation per output tensor once the models' headers are known.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .methods import ParamScope, get_method

Scalar = float | bool


class Conditional(BaseModel):
    """A parameter value for the tensors whose names contain `filter` (all tensors when None or `*`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Scalar

    def matches(self, tensor_name: str) -> bool:
        return self.filter in (None, "*") or (self.filter or "") in tensor_name


def _as_conditionals(value: Any) -> Any:
    """Accept a bare scalar as shorthand for `[{value: scalar}]`."""
    if isinstance(value, bool | int | float):
        return [{"value": value}]
    if isinstance(value, dict):
        return [value]
    return value


Setting = Annotated[list[Conditional], BeforeValidator(_as_conditionals)]


def resolve(setting: list[Conditional] | None, tensor_name: str) -> Scalar | None:
    """The value of the first entry that matches `tensor_name`, or None when none does."""
    for entry in setting or ():
        if entry.matches(tensor_name):
            return entry.value
    return None


class SliceSource(BaseModel):
    """Layers `[layers[0], layers[1])` of the model named `model`."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layers: tuple[int, int]
    params: dict[str, Setting] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _range(self) -> SliceSource:
        start, end = self.layers
        if start < 0 or end <= start:
            raise ValueError(f"layers must be [start, end) with 0 <= start < end, got {list(self.layers)}")
        return self

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


class LayerSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    sources: list[SliceSource] = Field(min_length=1)
    base: SliceSource | None = None
    params: dict[str, Setting] = Field(default_factory=dict)
    output_scale: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Depth-wise integration scale: multiplies the hidden state (residual stream) that leaves each "
            "layer of this slice, as in Su & Geiping's DIS. The engine realises it without custom model "
            "code by dividing the o_proj and down_proj weights of every later layer by the product of the "
            "scales before it; RMSNorm makes the two equal up to its epsilon."
        ),
    )

    @model_validator(mode="after")
    def _fits_method(self) -> LayerSlice:
        spec = get_method(self.method)
        if spec.needs_base and self.base is None:
            raise ValueError(f"method {self.method!r} needs a base: set `base: {{model: ..., layers: [a, b]}}`")
        if not spec.needs_base and self.base is not None:
            raise ValueError(f"method {self.method!r} takes no base; list that model under `sources` instead")
        if len(self.sources) < spec.min_sources:
            raise ValueError(f"method {self.method!r} needs at least {spec.min_sources} source(s)")
        if spec.max_sources is not None and len(self.sources) > spec.max_sources:
            raise ValueError(
                f"method {self.method!r} takes at most {spec.max_sources} source(s), got {len(self.sources)}"
            )
        counts = {s.num_layers for s in self.sources} | ({self.base.num_layers} if self.base else set())
        if len(counts) > 1:
            raise ValueError(
                f"every source (and the base) of a slice must span the same number of layers, got {sorted(counts)}"
            )
        known = {p.name for p in spec.params}
        for name, setting in self.params.items():
            if name not in known:
                raise ValueError(
                    f"method {self.method!r} has no parameter {name!r}; it takes: {sorted(known) or 'none'}"
                )
            for entry in setting:
                spec.param(name).check(entry.value)
        source_params = {p.name for p in spec.source_params}
        for index, source in enumerate(self.sources):
            for name, setting in source.params.items():
                if name not in source_params:
                    raise ValueError(
                        f"sources[{index}].params.{name}: not a per-source parameter of {self.method!r} "
                        f"(per-source: {sorted(source_params) or 'none'}; put shared ones under the slice's params)"
                    )
                for entry in setting:
                    spec.param(name).check(entry.value)
        if self.base is not None and self.base.params:
            raise ValueError("base.params: the base model takes no parameters")
        return self

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers

    def models(self) -> list[str]:
        return [s.model for s in self.sources] + ([self.base.model] if self.base else [])

    def shared_value(self, name: str, tensor_name: str) -> Scalar | None:
        spec = get_method(self.method).param(name)
        assert spec.scope is ParamScope.SHARED
        value = resolve(self.params.get(name), tensor_name)
        return spec.default if value is None else value

    def source_value(self, index: int, name: str, tensor_name: str) -> Scalar | None:
        """A per-source parameter: the source's own setting, then the slice's, then the default."""
        spec = get_method(self.method).param(name)
        value = resolve(self.sources[index].params.get(name), tensor_name)
        if value is None:
            value = resolve(self.params.get(name), tensor_name)
        return spec.default if value is None else value


OutputDType = Literal["float32", "bfloat16", "float16"]


class MergePlan(BaseModel):
    """An ordered list of layer slices over named models; see the module docstring."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    models: dict[str, str] = Field(description="model name -> location (path, file:// or s3:// URI)")
    base_model: str | None = Field(
        default=None,
        description="whose config.json and tokenizer the output takes (default: the first slice's first source)",
    )
    slices: list[LayerSlice] = Field(min_length=1)
    dtype: OutputDType | None = Field(default=None, description="output dtype; default: the inputs' dtype")
    seed: int = Field(default=0, description="seeds DARE's random drop: the same plan gives the same bits")
    embed_slice: int = Field(
        default=0, ge=0, description="whose method and parameters the tensors before the layers (embeddings) follow"
    )
    head_slice: int = Field(
        default=-1, description="whose method and parameters the tensors after the layers (final norm, lm_head) follow"
    )

    @model_validator(mode="after")
    def _known_models(self) -> MergePlan:
        for name in ("embed_slice", "head_slice"):
            index = getattr(self, name)
            if not -len(self.slices) <= index < len(self.slices):
                raise ValueError(f"{name} is {index}, but the plan has {len(self.slices)} slices")
        if self.base_model is not None and self.base_model not in self.models:
            raise ValueError(f"base_model {self.base_model!r} is not one of models: {sorted(self.models)}")
        for i, layer_slice in enumerate(self.slices):
            for name in layer_slice.models():
                if name not in self.models:
                    raise ValueError(
                        f"slices[{i}] uses model {name!r}, which is not one of models: {sorted(self.models)}"
                    )
        return self

    @property
    def config_model(self) -> str:
        """The model whose config.json and tokenizer the output carries."""
        return self.base_model or self.slices[0].sources[0].model

    @property
    def num_layers(self) -> int:
        return sum(s.num_layers for s in self.slices)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MergePlan:
        return cls.model_validate_json(text)
