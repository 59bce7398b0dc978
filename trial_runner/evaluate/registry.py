"""The one registry of evaluator backends, keyed by the name a trial spec gives (`backend: vllm`).

Each backend declares its settings model (torch-free, `settings.py`) and where its implementation
lives; the implementation is imported only when an evaluator is opened, so validating a spec, or
choosing `hf`, never imports vLLM. To add a backend, add one `Backend` to `BACKENDS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .base import Evaluator, ModelSource
from .settings import HFSettings, KeptEngineSettings, VLLMSettings


@dataclass(frozen=True)
class Backend:
    name: str
    settings: type[KeptEngineSettings]  # every backend's settings say how trials keep its engine
    implementation: str  # "module:Class", relative to this package

    def load(self) -> type[Evaluator]:
        module_name, class_name = self.implementation.split(":")
        cls = getattr(importlib.import_module(module_name, __package__), class_name)
        assert issubclass(cls, Evaluator) and cls.name == self.name
        return cls


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("hf", HFSettings, ".hf_backend:HFEvaluator"),
        Backend("vllm", VLLMSettings, ".vllm_backend:VLLMEvaluator"),
    )
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"The value of `backend` is {name!r}, but must be one of {sorted(BACKENDS)}.")
    return BACKENDS[name]


def validate_settings(backend: str, settings: Mapping[str, Any] | BaseModel | None = None) -> KeptEngineSettings:
    """The backend's settings model from a mapping (a `ValueError` names any bad or unknown field)."""
    model = get_backend(backend).settings
    if isinstance(settings, model):
        return settings
    if isinstance(settings, BaseModel):
        raise TypeError(f"settings for backend {backend!r} must be {model.__name__}, not {type(settings).__name__}")
    return model.model_validate(dict(settings or {}))


def open_evaluator(
    backend: str, *, model: ModelSource, settings: Mapping[str, Any] | BaseModel | None = None
) -> Evaluator:
    """Load `model` (a directory, or an `InMemoryModel` for hf) into a new evaluator of `backend`.

    Raises `ValueError` for an unknown backend or bad settings (the field named): a user error under
    `errors.classify`. Everything else - a directory without config.json (the runner writes the merged
    model itself), a model the backend cannot load, a failure while starting the engine - propagates and
    counts as infrastructure there.
    """
    validated = validate_settings(backend, settings)
    return get_backend(backend).load()(model=model, settings=validated)
