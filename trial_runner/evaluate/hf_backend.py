"""The `hf` backend: transformers in this process, on CPU or GPU, from a directory or from memory.

A merged model can be evaluated without touching disk: `InMemoryModel(*merge_to_state_dict(...))`
goes through the same `from_pretrained` loading path (key renames, weight tying, dtype) as a model
directory, so both give the same logits. A loaded model also takes another model's weights in place
(`load_weights`, `load_merge`: what an engine host does across trials) by copying each tensor into the
parameter of its name, which casts as `from_pretrained` does. That needs the model's parameters named as
the checkpoint's tensors (`in_place_parameters`); where transformers renamed or split them while
loading, `load_weights` loads the model anew and `load_merge` is refused (the host then writes the merge).

Decoding is a plain greedy loop over the model's forward pass with a KV cache, not `generate()`:
argmax of the raw logits, no logits processors, so a checkpoint's generation_config.json (sampling
settings, repetition penalties) cannot change results, exactly as with the vLLM backend. Prompts are
sorted by length and batched (`batch_size`), LEFT padded (position ids from the attention mask), so
every row's next token sits in the last column; rows that have ended leave the batch (with their KV
cache) once a quarter of it has ended, and the batch ends when every row has. Scoring choices
uses the same left padding and keeps only the logits of the last few positions, so the vocabulary-wide
log-softmax is never materialised for the whole prompt.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..checkpoint import Checkpoint
from ..merge.io import TensorReader
from ..merge.resident import merge_into
from ..plan.ir import MergePlan
from .base import InMemoryModel, KeptEngine, ModelSource
from .prompts import ContinuationRequest, GenerationRequest, PromptBuilder, stop_token_ids
from .settings import HFSettings, checkpoint_dtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPACT_AT = 0.75  # drop ended rows from a batch once at most this share of it is still decoding


def load_model(model: ModelSource, settings: HFSettings) -> tuple[torch.nn.Module, Any, Path]:
    """(model on its device in eval mode, tokenizer, directory of the tokenizer and generation config)."""
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, InMemoryModel):
        config_dict = dict(model.config)
        config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
        tokenizer_dir = Path(model.tokenizer_dir)
        state_dict: dict[str, torch.Tensor] | None = dict(model.state_dict)
        path = None
    else:
        tokenizer_dir = path = Path(model)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
        config_dict = json.loads((path / "config.json").read_text())
        config = AutoConfig.from_pretrained(path)
        state_dict = None
    dtype_name = checkpoint_dtype(config_dict) if settings.dtype == "auto" else settings.dtype
    if dtype_name not in _DTYPES:
        raise ValueError(
            f"the checkpoint's dtype {dtype_name!r} is not one of {sorted(_DTYPES)}; set the dtype setting"
        )
    dtype = _DTYPES[dtype_name]
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    loaded = model_class.from_pretrained(
        path, config=config, state_dict=state_dict, dtype=dtype, attn_implementation=settings.attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return loaded.to(device).eval(), tokenizer, tokenizer_dir


def in_place_parameters(model: torch.nn.Module, names: Collection[str]) -> dict[str, torch.Tensor] | None:
    """The model's tensor of each checkpoint tensor name, when copying the checkpoint's tensors into them
    sets exactly what `from_pretrained` set: every name is a parameter or persistent buffer of the model, no
    two names share one tensor, and every tensor of the model left unnamed shares one named (tied
    embeddings). None otherwise."""
    state = model.state_dict(keep_vars=True)
    if not set(names) <= set(state):
        return None
    named = {name: state[name] for name in names}
    storages = {tensor.data_ptr() for tensor in named.values()}
    if len(storages) != len(named) or any(t.data_ptr() not in storages for n, t in state.items() if n not in named):
        return None
    return named


class HFEvaluator(KeptEngine):
    name = "hf"

    @classmethod
    def preload(cls) -> None:
        import importlib

        # Loaded by transformers on first use: model loading, generation, the Llama family (the tiny
        # test models' and SmolLM2's architecture; others are imported when a model needs them).
        for module in (
            "transformers.modeling_utils",
            "transformers.generation.utils",
            "transformers.models.llama.modeling_llama",
        ):
            importlib.import_module(module)

    def __init__(self, *, model: ModelSource, settings: HFSettings) -> None:
        self.settings = settings
        self.model, tokenizer, tokenizer_dir = load_model(model, settings)
        names = model.state_dict.keys() if isinstance(model, InMemoryModel) else Checkpoint.open(model).tensors.keys()
        self._parameters = in_place_parameters(self.model, names)
        self.device = next(self.model.parameters()).device
        context_len = settings.max_model_len or int(self.model.config.max_position_embeddings)
        super().__init__(prompts=PromptBuilder(tokenizer, context_len, stop_token_ids(tokenizer, tokenizer_dir)))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)  # any id: padded positions are masked out

    @property
    def can_merge_in_place(self) -> bool:
        return self._parameters is not None

    def load_weights(self, model: Path) -> None:
        if self._parameters is None:
            self.model = load_model(model, self.settings)[0]
            self._parameters = in_place_parameters(self.model, Checkpoint.open(model).tensors.keys())
            return
        checkpoint = Checkpoint.open(model)
        with TensorReader() as reader:
            self._copy_in((name, reader.read(info)) for name, info in checkpoint.tensors.items())

    def load_merge(
        self, plan: MergePlan, model_dirs: Mapping[str, Path], *, device: str, limit_bytes: int | None
    ) -> dict[str, Any]:
        """`merge_into` the model's parameters, in this process (see `KeptEngine.load_merge`)."""
        if self._parameters is None:
            raise ValueError("this model's parameters are not named as its checkpoint's tensors; load a written merge")
        return merge_into(self._copy_in, plan, model_dirs, device=device, limit_bytes=limit_bytes)

    @torch.no_grad()
    def _copy_in(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy every tensor of a model of this one's shape into its parameter (cast to the parameter's dtype,
        as `from_pretrained` casts)."""
        assert self._parameters is not None
        left = set(self._parameters)
        for name, tensor in tensors:
            target = self._parameters.get(name)
            if target is None or target.shape != tensor.shape:
                raise RuntimeError(f"{name} {tuple(tensor.shape)} is not a tensor of the loaded model's shape")
            target.copy_(tensor)
            left.discard(name)
        if left:
            raise RuntimeError(f"the weights in place lack {sorted(left)[:3]} of the loaded model's tensors")

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Request indices by length, longest first, in batches (similar lengths pad little)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for start in range(0, len(order), self.settings.batch_size):
            yield order[start : start + self.settings.batch_size]

    def _left_padded(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    @torch.inference_mode()
    def _generate(self, requests: Sequence[GenerationRequest], *, stop: Sequence[str]) -> list[list[int]]:
        outputs: list[list[int]] = [[] for _ in requests]
        for batch in self._batches([len(r.prompt_ids) for r in requests]):
            for index, tokens in zip(batch, self._generate_batch([requests[i] for i in batch], stop), strict=True):
                outputs[index] = tokens
        return outputs

    def _generate_batch(self, requests: Sequence[GenerationRequest], stop: Sequence[str]) -> list[list[int]]:
        ids, mask, positions = self._left_padded([r.prompt_ids for r in requests])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, last = out.past_key_values, positions[:, -1:]
        tokens: list[list[int]] = [[] for _ in requests]
        rows = list(range(len(requests)))  # the request of each row still in the batch
        active = [r.max_new_tokens > 0 for r in requests]
        while True:
            chosen = out.logits[:, -1].argmax(-1)
            for row, token in enumerate(chosen.tolist()):
                i = rows[row]
                if active[i]:
                    tokens[i].append(token)
                    if len(tokens[i]) >= requests[i].max_new_tokens or self.prompts.finished(tokens[i], stop):
                        active[i] = False
            alive = [row for row, i in enumerate(rows) if active[i]]
            if not alive:
                return tokens
            if len(alive) <= len(rows) * COMPACT_AT:
                # Short answers end early: drop their rows (and cache) rather than decode them to the
                # longest answer. Not at every ended row: each drop copies the whole KV cache.
                keep = torch.tensor(alive, device=self.device)
                cache.batch_select_indices(keep)
                chosen, mask, last = chosen[keep], mask[keep], last[keep]
                rows = [rows[row] for row in alive]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            last = last + 1
            out = self.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=last,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values

    @torch.inference_mode()
    def _loglikelihoods(self, requests: Sequence[ContinuationRequest]) -> list[float]:
        scores = [0.0] * len(requests)
        rows = [r.context_ids + r.continuation_ids for r in requests]
        for batch in self._batches([len(r) for r in rows]):
            ids, mask, positions = self._left_padded([rows[i] for i in batch])
            tail = max(len(requests[i].continuation_ids) for i in batch)
            # Logits at the last tail + 1 positions predict the last tail tokens (the final logit is unused).
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=tail + 1
            ).logits[:, :-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            targets = ids[:, -tail:]
            picked = logprobs.gather(-1, targets[..., None])[..., 0]  # (batch, tail)
            for row, index in enumerate(batch):
                n = len(requests[index].continuation_ids)
                scores[index] = float(picked[row, tail - n :].sum())
        return scores

    def _release(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
