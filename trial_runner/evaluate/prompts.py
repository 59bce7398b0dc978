"""Prompts as token ids, built in one place for every backend, and completions read back the same way.

Backends never tokenize, render chat templates or decide when a sequence ends: they receive token ids
from here and return token ids. That is what keeps `hf` and `vllm` from drifting apart:

- Text: `task.few_shot + sample.prompt`.
- Chat (`task.chat_template`): that text is the one user message, rendered with the tokenizer's chat
  template with the generation prompt (assistant turn) opened. A tokenizer without a template is an
  error, not a silent fallback to plain text.
- BOS: plain text is tokenized with the tokenizer's own special tokens (Llama-2 and the tiny world's
  tokenizer prepend BOS; SmolLM2's does not); a rendered chat template is tokenized without them,
  since templates write their own BOS when the model wants one. A doubled BOS at the start (a few-shot
  prefix or template that writes it and a tokenizer that adds it) is cut to one.
- Multiple choice: each choice's tokens (no special tokens) follow the prompt's tokens; the choice is
  scored by the sum of their log-probabilities (`metric: acc_norm`: divided by the choice's characters).
- End of a completion: the tokenizer's EOS and every `eos_token_id` of generation_config.json (what
  vLLM stops on as well), or a stop string, or the token budget. The completion text is the decoded
  tokens without special tokens; scoring then cuts it at the first stop string (`tasks.extract_answer`).
- Budget: `min(task.max_new_tokens, context_len - prompt tokens)`; a prompt that leaves no room is a
  `TaskModelError` naming the task and sample, never a silent truncation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tasks import Sample, TaskSpec


class TaskModelError(ValueError):
    """The task cannot be evaluated with this model as configured (a user error: retrying will not help).

    For example a prompt longer than the model's context, or a chat-template task for a tokenizer that
    has no chat template. The message names the task, the sample and the fix.
    """


@dataclass(frozen=True)
class GenerationRequest:
    """Greedy-decode up to `max_new_tokens` after `prompt_ids`."""

    prompt_ids: list[int]
    max_new_tokens: int


@dataclass(frozen=True)
class ContinuationRequest:
    """The summed log-probability of `continuation_ids` following `context_ids`."""

    context_ids: list[int]
    continuation_ids: list[int]


def stop_token_ids(tokenizer: Any, model_dir: Path | str) -> frozenset[int]:
    """The tokens that end a completion: the tokenizer's EOS and generation_config.json's `eos_token_id`s."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = Path(model_dir) / "generation_config.json"
    if generation_config.exists():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return frozenset(ids)


@dataclass(frozen=True)
class PromptBuilder:
    """Turns task samples into token-id requests and generated token ids back into completions."""

    tokenizer: Any  # a transformers tokenizer (PreTrainedTokenizerBase)
    context_len: int  # the most tokens (prompt + generated) one sequence may hold
    stop_ids: frozenset[int]

    def text(self, task: TaskSpec, sample: Sample) -> str:
        text = task.prompt(sample)
        if not task.chat_template:
            return text
        if not getattr(self.tokenizer, "chat_template", None):
            raise TaskModelError(
                f"task {task.name}: chat_template is true, but the model's tokenizer has no chat template; "
                "set chat_template: false or use a model that ships one"
            )
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def prompt_ids(self, task: TaskSpec, sample: Sample) -> list[int]:
        ids = list(self.tokenizer(self.text(task, sample), add_special_tokens=not task.chat_template)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def generation_requests(self, task: TaskSpec, samples: Sequence[Sample]) -> list[GenerationRequest]:
        requests = []
        for index, sample in enumerate(samples):
            ids = self.prompt_ids(task, sample)
            room = self.context_len - len(ids)
            if room < 1:
                raise TaskModelError(
                    f"task {task.name}, sample {index} of the range: the prompt has {len(ids)} tokens, but the "
                    f"model's context holds {self.context_len}; shorten few_shot or raise max_model_len"
                )
            requests.append(GenerationRequest(ids, min(task.max_new_tokens, room)))
        return requests

    def continuation_requests(self, task: TaskSpec, samples: Sequence[Sample]) -> list[ContinuationRequest]:
        """One request per (sample, choice), samples in order, each sample's choices in order."""
        requests = []
        for index, sample in enumerate(samples):
            context = self.prompt_ids(task, sample)
            for choice in sample.choices:
                continuation = list(self.tokenizer(choice, add_special_tokens=False)["input_ids"])
                if not continuation:
                    raise TaskModelError(f"task {task.name}, sample {index} of the range: choice {choice!r} is empty")
                # One position is left free: an engine that scores a prompt also decodes a token after it.
                if len(context) + len(continuation) >= self.context_len:
                    raise TaskModelError(
                        f"task {task.name}, sample {index} of the range: prompt and choice take "
                        f"{len(context) + len(continuation)} tokens, but the model's context holds "
                        f"{self.context_len}; shorten few_shot or raise max_model_len"
                    )
                requests.append(ContinuationRequest(context, continuation))
        return requests

    def completion(self, token_ids: Sequence[int]) -> str:
        """The text of generated tokens (a final stop token and other special tokens left out)."""
        ids = list(token_ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def finished(self, token_ids: Sequence[int], stop: Sequence[str]) -> bool:
        """Whether a completion so far has ended: its last token stops it, or its text holds a stop string."""
        if token_ids and token_ids[-1] in self.stop_ids:
            return True
        if not stop:
            return False
        text = self.completion(token_ids)
        return any(s and s in text for s in stop)
