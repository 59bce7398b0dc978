"""The evaluator interface: score a range of one task's samples with one model, whatever the engine.

`Evaluator` is the policy interface a trial uses (`evaluate` a range, `close`); the backends (`hf`,
`vllm`) implement two primitives on token ids (greedy generation, continuation log-likelihood).
Everything else (prompts, budgets, when a completion ends, answer extraction, scoring, counting) lives
here and in `prompts`, once, so the backends cannot disagree about anything but arithmetic.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..tasks import Sample, TaskCounts, TaskSpec, answers_match, extract_answer, read_local_text
from .prompts import ContinuationRequest, GenerationRequest, PromptBuilder, TaskModelError

if TYPE_CHECKING:
    import torch

    from ..plan.ir import MergePlan


@dataclass(frozen=True)
class InMemoryModel:
    """A model held in memory, as `merge_to_state_dict` returns it: `InMemoryModel(*merge_to_state_dict(...))`.

    `config` is the output's config.json as a dict; `tokenizer_dir` the directory whose tokenizer and
    generation_config.json the model uses (the plan's config model).
    """

    state_dict: Mapping[str, torch.Tensor] = field(repr=False)
    config: Mapping[str, Any]
    tokenizer_dir: Path


ModelSource = Path | str | InMemoryModel  # a Hugging Face model directory, or a model in memory


def run_tests(task: TaskSpec, samples: Sequence[Sample], programs: Sequence[str]) -> list[bool]:
    """Whether each program passes its sample's tests in the sandbox (a code task's pass@1)."""
    from ..cores import cpu_quota_cores
    from .sandbox import SandboxLimits, run_programs

    limits = SandboxLimits(
        wall_seconds=task.program_timeout_seconds,
        cpu_seconds=max(1.0, task.program_timeout_seconds / 2),
        parallel=min(8, cpu_quota_cores() or os.cpu_count() or 1),  # the pod's cores, not the node's
    )
    sources = [
        (sample.prompt if task.prompt_in_program else "") + program + "\n\n" + (sample.tests or "")
        for sample, program in zip(samples, programs, strict=True)
    ]
    return [result.passed for result in run_programs(sources, limits)]


@dataclass(frozen=True)
class SampleResult:
    """How one sample scored. `prediction` is the extracted answer, or the chosen choice's index."""

    prediction: str
    correct: bool
    generated_tokens: int = 0
    completion: str = ""  # generation tasks: the decoded completion, before extraction
    choice_logprobs: tuple[float, ...] = ()  # multiple-choice tasks: each choice's summed log-probability


def count(results: Sequence[SampleResult]) -> TaskCounts:
    return TaskCounts(
        correct=sum(r.correct for r in results),
        evaluated=len(results),
        generated_tokens=sum(r.generated_tokens for r in results),
    )


class Evaluator(ABC):
    """Scores ranges of task samples with one loaded model.

    Contract:

    - `evaluate(task=, samples=)` scores every sample once and returns their counts. Greedy decoding
      makes it deterministic for a given model, backend, settings and machine. Each sample is scored on
      its own, so counts of consecutive ranges add up to the counts of their union (up to floating-point
      effects of batch shape, which can flip only exact near-ties of two tokens or two choices). An
      empty range gives `TaskCounts()`.
    - A backend gets every sample of a call at once and may batch and reorder them freely; results
      come back in sample order.
    - Raises `TaskModelError` (a `ValueError`) when the task cannot run on this model as configured
      (prompt longer than the context, chat template missing): a user error, do not retry. Any other
      exception is an infrastructure failure (out of memory, engine died) and may be retried in a fresh
      process.
    - Not thread-safe: one call at a time. `close()` releases the model (and the engine's processes);
      it is idempotent, and an evaluator is also a context manager. Calls after `close()` raise
      `RuntimeError`.

    Backends implement `_generate`, `_loglikelihoods` and `_release`; the registry (`registry.py`)
    creates them by name from a model and validated settings.
    """

    name: ClassVar[str]

    def __init__(self, *, prompts: PromptBuilder) -> None:
        self.prompts = prompts
        self._closed = False

    @classmethod
    @abstractmethod
    def preload(cls) -> None:
        """Import what opening this evaluator imports lazily, so that a process forked afterwards (the
        local fork server's trials) opens one without importing anything."""

    def evaluate(
        self, *, task: TaskSpec, samples: Sequence[Sample], read: Callable[[str], str] = read_local_text
    ) -> TaskCounts:
        return count(self.evaluate_samples(task=task, samples=samples, read=read))

    def evaluate_samples(
        self, *, task: TaskSpec, samples: Sequence[Sample], read: Callable[[str], str] = read_local_text
    ) -> list[SampleResult]:
        """Like `evaluate`, with each sample's result (for reports and debugging). `read` reads the task's
        files beyond its samples (an lm_eval task's config and few-shot documents) by URI."""
        if self._closed:
            raise RuntimeError(f"the {self.name} evaluator is closed")
        if not samples:
            return []
        if task.kind in ("generate", "code"):
            return self._score_generations(task, samples)
        if task.kind == "lm_eval":
            try:
                from .lm_eval_tasks import score_documents
            except ImportError as exc:
                raise TaskModelError(
                    f"task {task.name} is an lm_eval task, but lm-evaluation-harness cannot be imported here ({exc}); "
                    "install the lm-eval extra: pip install 'mergesearch[lm-eval]'"
                ) from None
            return score_documents(self, task, samples, read=read)
        return self._score_choices(task, samples)

    def _score_generations(self, task: TaskSpec, samples: Sequence[Sample]) -> list[SampleResult]:
        if task.kind == "generate" and any(s.answer is None for s in samples):
            raise TaskModelError(f"task {task.name}: a generation task needs an answer for every sample")
        requests = self.prompts.generation_requests(task, samples)
        outputs = self._generate(requests, stop=tuple(task.stop))
        completions = [self.prompts.completion(tokens) for tokens in outputs]
        predictions = [extract_answer(completion, task) for completion in completions]
        if task.kind == "code":
            passed = run_tests(task, samples, predictions)
        else:
            passed = [answers_match(p, s.answer or "") for p, s in zip(predictions, samples, strict=True)]
        return [
            SampleResult(prediction, correct, len(tokens), completion)
            for prediction, correct, tokens, completion in zip(predictions, passed, outputs, completions, strict=True)
        ]

    def _score_choices(self, task: TaskSpec, samples: Sequence[Sample]) -> list[SampleResult]:
        if any(len(s.choices) < 2 or s.gold is None for s in samples):
            raise TaskModelError(f"task {task.name}: a multiple-choice task needs choices and gold for every sample")
        scores = iter(self._loglikelihoods(self.prompts.continuation_requests(task, samples)))
        results = []
        for sample in samples:
            # A broken merge can give NaN: such a choice is never picked, and a sample with no
            # finite choice is wrong (a bad model scores low, it does not fail the trial).
            logprobs = tuple(-math.inf if math.isnan(x) else x for x in (next(scores) for _ in sample.choices))
            # acc_norm, as lm-eval's: log-likelihood per character, so that long choices are not penalised.
            ranked = (
                [lp / max(1, len(choice)) for lp, choice in zip(logprobs, sample.choices, strict=True)]
                if task.metric == "acc_norm"
                else logprobs
            )
            best = max(range(len(ranked)), key=lambda i: (ranked[i], -i))  # ties go to the first choice
            if logprobs[best] == -math.inf:
                results.append(SampleResult("", False, 0, choice_logprobs=logprobs))
            else:
                results.append(SampleResult(str(best), best == sample.gold, 0, choice_logprobs=logprobs))
        return results

    @abstractmethod
    def _generate(self, requests: Sequence[GenerationRequest], *, stop: Sequence[str]) -> list[list[int]]:
        """Greedy (argmax of the raw logits) token ids after each prompt, in request order.

        Each sequence ends after its first token in `self.prompts.stop_ids` (kept in the output), after
        the token whose text completes a stop string (`self.prompts.finished`), or at `max_new_tokens`.
        """

    @abstractmethod
    def _loglikelihoods(self, requests: Sequence[ContinuationRequest]) -> list[float]:
        """Σ log p(continuation token | everything before it), natural log, raw logits, in request order."""

    @abstractmethod
    def _release(self) -> None:
        """Free the model and stop any engine processes (called once, by `close`)."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class KeptEngine(Evaluator):
    """An evaluator whose engine takes another model's weights in place, when that model is one of the shape
    it was built for: what an engine host keeps across trials (`engine_host`). Both backends are."""

    @property
    @abstractmethod
    def can_merge_in_place(self) -> bool:
        """Whether `load_merge` can run on this engine (else trials write their merges for `load_weights`)."""

    @abstractmethod
    def load_weights(self, model: Path) -> None:
        """Load the weights of the model directory `model`, one of this engine's shape, in place."""

    @abstractmethod
    def load_merge(
        self, plan: MergePlan, model_dirs: Mapping[str, Path], *, device: str, limit_bytes: int | None
    ) -> dict[str, Any]:
        """Compute `plan`'s merge from the process's resident experts (`merge.resident.merge_into`) straight
        into the engine's weights, no checkpoint written or read; the merge must be of this engine's shape.
        Returns `merge_into`'s report: where the experts are held and why, and the seconds it took."""
