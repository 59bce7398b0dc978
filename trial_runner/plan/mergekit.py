"""Reading a mergekit YAML recipe as a merge plan, so `mergesearch merge` is a drop-in for `mergekit-yaml`.

Supported: `models:` or `slices:` syntax, `base_model`, `parameters` at every level with per-filter
values and layer gradients, `dtype`/`out_dtype`, for the methods MergeSearch implements. What it cannot
honour it refuses by name (never silently drops): `modules:`, LoRA references, tokenizer surgery,
`residual_weight`, models that are not local directories.

How mergekit resolves a parameter, and how it is kept: for each tensor, the first of (the source's
settings, the slice's, the file's) that has the parameter and a matching filter wins. Concatenating
those lists in that order and taking the first match (the plan's rule) gives the same value. Gradients
(a list of numbers instead of a number) are interpolated over the slice's layers with
`t = i / (n - 1)`; the plan has no gradients, so such slices become one slice per layer with the value
at that layer. The embeddings follow the first slice at t = 0 and the final norm and lm_head the last
slice at t = 0, as in mergekit. Filters are matched against output tensor names (mergekit matches
per-model parameters against the input's name, which differs only for filters that name a layer index).

Differences in numerics, by design: every method accumulates in float32 (mergekit computes some in the
`dtype` it is given), and DARE rescales kept entries by 1/density as the paper does (mergekit matches
the L1 norm instead); DARE draws differ from mergekit's anyway, being seeded per tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .ir import MergePlan
from .methods import METHODS, get_method

Value = bool | int | float | str | list[Any]
_IGNORED_PARAMS = {"int8_mask"}  # changes only the mask's storage dtype in mergekit, not the result


class MergekitError(ValueError):
    pass


class _Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Value


Setting = Any  # a value, a gradient list, a {filter, value} mapping, or a list of those mappings


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] | None = None


class _SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None


class _Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[_SliceSource]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, Setting] | None = None


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[_Model] | None = None
    slices: list[_Slice] | None = None
    modules: dict[str, Any] | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None


def _conditionals(setting: Setting | None) -> list[dict[str, Any]]:
    """A setting as a list of `{filter, value}` (value possibly still a gradient list)."""
    if setting is None:
        return []
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        try:
            conditionals = [_Conditional.model_validate(e) for e in setting]
        except ValidationError as exc:
            raise MergekitError(f"parameter {setting!r}: {exc.errors()[0]['msg']}") from None
        return [{"filter": c.filter, "value": c.value} for c in conditionals]
    return [{"filter": None, "value": setting}]


def _at(value: Value, t: float, where: str) -> float | bool:
    """Evaluate a (possibly gradient) value at t, as mergekit does."""
    if isinstance(value, list):
        if not value:
            raise MergekitError(f"{where}: empty gradient list")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return _at(value[int(t * (len(value) - 1))], t, where)
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(value[i0]) + frac * float(value[i1])
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        try:
            return float(value)
        except ValueError:
            raise MergekitError(f"{where}: {value!r} is not a number or a boolean") from None
    if isinstance(value, bool):
        return value
    return float(value)


def _has_gradient(settings: list[dict[str, Any]]) -> bool:
    return any(isinstance(entry["value"], list) for entry in settings)


def _dtype(name: str | None, where: str) -> str | None:
    if name is None:
        return None
    aliases = {
        "float32": "float32",
        "fp32": "float32",
        "bfloat16": "bfloat16",
        "bf16": "bfloat16",
        "float16": "float16",
        "fp16": "float16",
    }
    if name not in aliases:
        raise MergekitError(f"{where}: dtype {name!r} is not supported; use float32, bfloat16 or float16")
    return aliases[name]


def _model_dir(reference: str, base_dir: Path) -> Path:
    if "+" in reference:
        raise MergekitError(
            f"model {reference!r}: LoRA references (model+lora) are not supported; merge the LoRA first"
        )
    path = Path(reference)
    if not path.is_absolute():
        path = (base_dir / path) if (base_dir / path).exists() else path
    if not (path / "config.json").exists():
        raise MergekitError(
            f"model {reference!r} is not a local model directory; MergeSearch reads models from disk or S3 "
            "(download it first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`)"
        )
    return path.resolve()


def _layer_count(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise MergekitError(f"{model_dir}/config.json has no layer count")


def from_mergekit_yaml(
    text: str, *, base_dir: Path = Path("."), layer_count: Callable[[Path], int] = _layer_count
) -> MergePlan:
    """Translate a mergekit YAML recipe (its text) into a `MergePlan` over local model directories."""
    try:
        config = _Config.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(p) for p in first["loc"])
        raise MergekitError(f"{location}: {first['msg']}") from None
    for unsupported, hint in (
        ("modules", "use `slices:` or `models:`"),
        ("tokenizer", "MergeSearch merges models that share one tokenizer"),
        ("chat_template", "edit the output's tokenizer_config.json instead"),
    ):
        if getattr(config, unsupported) is not None:
            raise MergekitError(f"{unsupported}: not supported; {hint}")
    if config.tokenizer_source not in (None, "base"):
        raise MergekitError(
            "tokenizer_source: only `base` is supported; MergeSearch merges models that share one tokenizer"
        )
    if config.merge_method not in METHODS:
        raise MergekitError(f"merge_method: {config.merge_method!r} is not supported; use one of {sorted(METHODS)}")
    spec = get_method(config.merge_method)
    if bool(config.models) == bool(config.slices):
        raise MergekitError("give exactly one of `models:` or `slices:`")

    names: dict[str, str] = {}  # reference -> plan model name
    paths: dict[str, Path] = {}

    def name_of(reference: str) -> str:
        if reference not in names:
            path = _model_dir(reference, base_dir)
            stem = path.name or "model"
            name = stem
            suffix = 2
            while name in paths:
                name = f"{stem}-{suffix}"
                suffix += 1
            names[reference], paths[name] = name, path
        return names[reference]

    base_name = name_of(config.base_model) if config.base_model else None

    slices_in: list[_Slice]
    if config.models:
        references = [m.model for m in config.models]
        entries = list(config.models)
        if config.base_model and config.base_model not in references:
            entries.append(_Model(model=config.base_model))
        slices_in = [
            _Slice(
                sources=[
                    _SliceSource(
                        model=m.model, layer_range=(0, layer_count(paths[name_of(m.model)])), parameters=m.parameters
                    )
                    for m in entries
                ]
            )
        ]
    else:
        slices_in = list(config.slices or [])

    global_settings = {k: _conditionals(v) for k, v in (config.parameters or {}).items()}
    plan_slices: list[dict[str, Any]] = []
    starts: list[int] = []  # index of each input slice's first plan slice
    for i, slice_in in enumerate(slices_in):
        where = f"slices[{i}]"
        if slice_in.residual_weight is not None:
            raise MergekitError(f"{where}.residual_weight: not supported")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in slice_in.sources}
        if len(lengths) != 1:
            raise MergekitError(f"{where}: all inputs to a slice must contain the same number of layers")
        count = lengths.pop()
        slice_base = slice_in.base_model or config.base_model
        slice_settings = {k: _conditionals(v) for k, v in (slice_in.parameters or {}).items()}
        shared = {
            k: slice_settings.get(k, []) + global_settings.get(k, []) for k in {*slice_settings, *global_settings}
        }
        base_source = None
        sources = []
        for j, source in enumerate(slice_in.sources):
            if spec.needs_base and slice_base is not None and source.model == slice_base:
                base_source = source
            else:
                sources.append((j, source))
        if spec.needs_base and base_source is None:
            raise MergekitError(f"{where}: {spec.name!r} needs the base model among the slice's sources")
        for params in [shared, *[{k: v for k, v in (s.parameters or {}).items()} for _, s in sources]]:
            for key in params:
                if key not in {p.name for p in spec.params} | _IGNORED_PARAMS:
                    raise MergekitError(
                        f"{where}: parameter {key!r} does not exist for {spec.name!r} "
                        f"(it takes {sorted(p.name for p in spec.params)})"
                    )

        per_source_settings = [{k: _conditionals(v) for k, v in (s.parameters or {}).items()} for _, s in sources]
        gradient = _has_gradient([e for v in shared.values() for e in v]) or any(
            _has_gradient([e for v in ps.values() for e in v]) for ps in per_source_settings
        )
        steps = [(k, 1) for k in range(count)] if gradient else [(0, count)]
        starts.append(len(plan_slices))
        for offset, width in steps:
            t = (offset / (count - 1) if count > 1 else 1.0) if gradient else 0.0

            def evaluate(settings: dict[str, list[dict[str, Any]]], at: float, path: str) -> dict[str, Any]:
                return {
                    key: [{"filter": e["filter"], "value": _at(e["value"], at, f"{path}.{key}")} for e in entries]
                    for key, entries in settings.items()
                    if key not in _IGNORED_PARAMS and entries
                }

            plan_slices.append(
                {
                    "method": spec.name,
                    "params": evaluate(shared, t, f"{where}.parameters"),
                    "sources": [
                        {
                            "model": name_of(s.model),
                            "layers": [s.layer_range[0] + offset, s.layer_range[0] + offset + width],
                            "params": evaluate(per_source_settings[n], t, f"{where}.sources[{j}].parameters"),
                        }
                        for n, (j, s) in enumerate(sources)
                    ],
                    **(
                        {
                            "base": {
                                "model": name_of(base_source.model),
                                "layers": [
                                    base_source.layer_range[0] + offset,
                                    base_source.layer_range[0] + offset + width,
                                ],
                            }
                        }
                        if base_source is not None
                        else {}
                    ),
                }
            )
    # mergekit resolves the final norm's and lm_head's parameters on the last slice at t = 0, which is
    # the first of the per-layer slices that slice became.
    head_slice = starts[-1]
    return MergePlan.model_validate(
        {
            "models": {name: str(path) for name, path in paths.items()},
            "base_model": base_name,
            "slices": plan_slices,
            "dtype": _dtype(config.out_dtype or config.dtype, "dtype"),
            "embed_slice": 0,
            "head_slice": head_slice,
        }
    )
