"""Evaluators: score ranges of task samples with a merged model, through transformers (`hf`) or vLLM.

    from mergesearch_trial_runner.evaluate import InMemoryModel, open_evaluator

    with open_evaluator("vllm", model=merged_dir, settings={"max_model_len": 4096}) as evaluator:
        counts = evaluator.evaluate(task=spec, samples=search[start:end])

    with open_evaluator("hf", model=InMemoryModel(*merge_to_state_dict(plan, model_dirs=dirs))) as evaluator:
        ...

Importing this package needs neither torch nor vLLM; a backend's libraries load when it is opened.
"""

from .base import Evaluator, InMemoryModel, ModelSource, SampleResult
from .prompts import PromptBuilder, TaskModelError
from .registry import BACKENDS, Backend, get_backend, open_evaluator, validate_settings
from .settings import CPU_DEFAULTS, GPU_DEFAULTS, EngineLaunch, HFSettings, VLLMSettings

__all__ = [
    "BACKENDS",
    "CPU_DEFAULTS",
    "GPU_DEFAULTS",
    "Backend",
    "EngineLaunch",
    "Evaluator",
    "HFSettings",
    "InMemoryModel",
    "ModelSource",
    "PromptBuilder",
    "SampleResult",
    "TaskModelError",
    "VLLMSettings",
    "get_backend",
    "open_evaluator",
    "validate_settings",
]
