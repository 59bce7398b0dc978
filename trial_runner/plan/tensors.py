"""Lowering a merge plan to one operation per output tensor, before any weight is read.

`plan_tensors` needs only the models' config.json and safetensors headers, so it runs in the operator
(to reject a bad plan or a mismatched expert up front) as well as in the engine (which then executes the
operations one by one). Every error names the plan field or the tensor at fault.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .ir import LayerSlice, MergePlan, Scalar
from .methods import get_method

LAYER_TENSOR = re.compile(r"^(?P<prefix>.*\blayers)\.(?P<index>\d+)\.(?P<suffix>.+)$")
# Architectures whose blocks add o_proj's and down_proj's outputs straight onto the residual stream, so
# that DIS's output scale can be folded into those weights.
FOLDABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
RESIDUAL_OUTPUT_PROJECTIONS = (".o_proj.", ".down_proj.")
_VOCAB_TENSORS = ("embed_tokens", "lm_head", "wte")
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class PlanError(ValueError):
    """A plan that cannot be executed on these models. `field` is the plan path at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class TensorLike(Protocol):
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


class ModelStructure(Protocol):
    """What lowering needs to know of a model: `Checkpoint` provides it, so can S3 header reads."""

    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def tensors(self) -> Mapping[str, TensorLike]: ...


@dataclass(frozen=True)
class TensorInput:
    model: str
    tensor: str


@dataclass(frozen=True)
class TensorOp:
    output: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name of the output
    method: str
    sources: tuple[TensorInput, ...]
    base: TensorInput | None
    shared: Mapping[str, Scalar]
    per_source: tuple[Mapping[str, Scalar], ...]
    seed: int
    scale: float = 1.0  # folded DIS factor, applied to the merged tensor


@dataclass
class TensorPlan:
    ops: list[TensorOp]
    config: dict[str, Any]
    config_model: str
    models: dict[str, str] = field(default_factory=dict)

    @property
    def inputs(self) -> set[TensorInput]:
        return {i for op in self.ops for i in (*op.sources, *([op.base] if op.base else []))}


def num_layers(config: Mapping[str, Any]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise PlanError("", "config.json has no layer count (num_hidden_layers)")


def _layer_count_key(config: Mapping[str, Any]) -> str:
    return next(k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config)


def tensor_seed(plan_seed: int, tensor_name: str) -> int:
    """A seed that depends on the plan's seed and the tensor alone (stable across processes)."""
    digest = hashlib.blake2b(f"{plan_seed}:{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _check_architectures(plan: MergePlan, models: Mapping[str, ModelStructure]) -> None:
    ref_name = plan.config_model
    ref = models[ref_name].config
    for name in sorted({m for s in plan.slices for m in s.models()}):
        config = models[name].config
        for key in ("model_type", "architectures", "hidden_size"):
            if config.get(key) != ref.get(key):
                raise PlanError(
                    f"models.{name}",
                    f"{key} is {config.get(key)!r} but {ref_name!r} has {ref.get(key)!r}; "
                    "only models of one architecture and size can be merged",
                )


def _check_ranges(plan: MergePlan, models: Mapping[str, ModelStructure]) -> None:
    for i, layer_slice in enumerate(plan.slices):
        parts = [(f"slices[{i}].sources[{j}]", s) for j, s in enumerate(layer_slice.sources)]
        if layer_slice.base is not None:
            parts.append((f"slices[{i}].base", layer_slice.base))
        for path, source in parts:
            available = num_layers(models[source.model].config)
            if source.layers[1] > available:
                raise PlanError(
                    f"{path}.layers",
                    f"[{source.layers[0]}, {source.layers[1]}) is out of range: "
                    f"model {source.model!r} has {available} layers",
                )


def _split_reference(tensor_names: list[str]) -> tuple[list[str], list[str], str, list[str]]:
    """(pre-layer tensors, per-layer suffixes, layer prefix, post-layer tensors) of the reference model."""
    pre, post, suffixes = [], [], set()
    prefix = ""
    for name in tensor_names:
        match = LAYER_TENSOR.match(name)
        if match:
            prefix = match["prefix"]
            suffixes.add(match["suffix"])
        elif "embed" in name:
            pre.append(name)
        else:
            post.append(name)
    return sorted(pre), sorted(suffixes), prefix, sorted(post)


def _resolve_params(
    layer_slice: LayerSlice, where: str, tensor: str
) -> tuple[dict[str, Scalar], tuple[dict[str, Scalar], ...]]:
    spec = get_method(layer_slice.method)
    shared: dict[str, Scalar] = {}
    for param in spec.shared_params:
        value = layer_slice.shared_value(param.name, tensor)
        if value is None:
            raise PlanError(
                f"{where}.params.{param.name}", f"required by {spec.name!r} but no entry matches tensor {tensor}"
            )
        shared[param.name] = value
    per_source = []
    for j in range(len(layer_slice.sources)):
        values: dict[str, Scalar] = {}
        for param in spec.source_params:
            value = layer_slice.source_value(j, param.name, tensor)
            if value is None:
                raise PlanError(
                    f"{where}.sources[{j}].params.{param.name}",
                    f"required by {spec.name!r} but neither the source nor the slice sets it for tensor {tensor}",
                )
            values[param.name] = value
        per_source.append(values)
    if spec.name == "linear" and shared["normalize"] and abs(sum(float(v["weight"]) for v in per_source)) < 1e-12:
        raise PlanError(
            f"{where}.sources",
            f"linear weights for tensor {tensor} sum to 0; with normalize: true that divides by zero",
        )
    return shared, tuple(per_source)


def _input(
    models: Mapping[str, ModelStructure], model: str, tensor: str, output: str, reference: TensorLike, ref_name: str
) -> TensorInput:
    available = models[model].tensors
    if tensor not in available:
        raise PlanError(
            f"models.{model}", f"lacks tensor {tensor} (needed for output {output}); is it the same architecture?"
        )
    shape = tuple(available[tensor].shape)
    if shape != tuple(reference.shape):
        if any(key in tensor for key in _VOCAB_TENSORS) and shape[1:] == tuple(reference.shape)[1:]:
            raise PlanError(
                f"models.{model}",
                f"vocabulary size differs: {tensor} has {shape[0]} rows but {ref_name!r} has {reference.shape[0]}; "
                "merge models that share one tokenizer (or resize their embeddings first)",
            )
        raise PlanError(
            f"models.{model}",
            f"tensor {tensor} has shape {list(shape)} but {ref_name!r}'s {output} has {list(reference.shape)}",
        )
    return TensorInput(model, tensor)


def plan_tensors(plan: MergePlan, models: Mapping[str, ModelStructure]) -> TensorPlan:
    """Lower `plan` to one `TensorOp` per output tensor, in output order; raise `PlanError` if it cannot run."""
    missing = sorted(({m for s in plan.slices for m in s.models()} | {plan.config_model}) - set(models))
    if missing:
        raise PlanError("models", f"no checkpoint given for {missing}")
    _check_architectures(plan, models)
    _check_ranges(plan, models)

    ref_name = plan.config_model
    reference = models[ref_name]
    pre, suffixes, prefix, post = _split_reference(list(reference.tensors))
    out_dtype = DTYPE_NAMES.get(plan.dtype or "")

    scales = [s.output_scale for s in plan.slices for _ in range(s.num_layers)]
    if any(s != 1.0 for s in scales[:-1]) and reference.config.get("model_type") not in FOLDABLE_MODEL_TYPES:
        raise PlanError(
            "slices",
            f"output_scale needs a block that adds o_proj and down_proj to the residual stream "
            f"({sorted(FOLDABLE_MODEL_TYPES)}); {reference.config.get('model_type')!r} is not one",
        )

    def op_for(
        where: str,
        layer_slice: LayerSlice,
        output: str,
        input_name: Callable[[int], str],
        ref_tensor: str,
        scale: float,
    ) -> TensorOp:
        """The op for `output`; `input_name(first_layer)` names the input tensor in a source starting there."""
        shape_ref = reference.tensors[ref_tensor]
        sources = tuple(
            _input(models, s.model, input_name(s.layers[0]), output, shape_ref, ref_name) for s in layer_slice.sources
        )
        base = None
        if layer_slice.base is not None:
            base = _input(
                models, layer_slice.base.model, input_name(layer_slice.base.layers[0]), output, shape_ref, ref_name
            )
        shared, per_source = _resolve_params(layer_slice, where, output)
        return TensorOp(
            output=output,
            shape=tuple(shape_ref.shape),
            dtype=out_dtype or shape_ref.dtype,
            method=layer_slice.method,
            sources=sources,
            base=base,
            shared=shared,
            per_source=per_source,
            seed=tensor_seed(plan.seed, output),
            scale=scale,
        )

    ops: list[TensorOp] = []
    first = plan.embed_slice % len(plan.slices)
    for name in pre:
        ops.append(op_for(f"slices[{first}]", plan.slices[first], name, lambda _start, n=name: n, name, 1.0))
    out_layer = 0
    cumulative = 1.0  # product of the output scales of the layers already emitted
    for i, layer_slice in enumerate(plan.slices):
        for offset in range(layer_slice.num_layers):
            for suffix in suffixes:
                folded = 1.0 / cumulative if any(p in f".{suffix}" for p in RESIDUAL_OUTPUT_PROJECTIONS) else 1.0
                ops.append(
                    op_for(
                        f"slices[{i}]",
                        layer_slice,
                        f"{prefix}.{out_layer}.{suffix}",
                        lambda start, o=offset, x=suffix: f"{prefix}.{start + o}.{x}",
                        f"{prefix}.0.{suffix}",
                        folded,
                    )
                )
            cumulative *= layer_slice.output_scale
            out_layer += 1
    last = plan.head_slice % len(plan.slices)
    for name in post:
        ops.append(op_for(f"slices[{last}]", plan.slices[last], name, lambda _start, n=name: n, name, 1.0))

    return TensorPlan(ops=ops, config=_output_config(plan, models), config_model=ref_name, models=dict(plan.models))


def _output_config(plan: MergePlan, models: Mapping[str, ModelStructure]) -> dict[str, Any]:
    config = copy.deepcopy(models[plan.config_model].config)
    config.pop("_name_or_path", None)
    config[_layer_count_key(config)] = plan.num_layers
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds follow their layers
        config["layer_types"] = [
            models[s.sources[0].model].config["layer_types"][s.sources[0].layers[0] + k]
            for s in plan.slices
            for k in range(s.num_layers)
        ]
    if plan.dtype:
        config["torch_dtype"] = plan.dtype
        config.pop("dtype", None)
    return config
