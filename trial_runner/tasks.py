"""Evaluation tasks: the JSONL format users write, splits, fidelity ranges, and scoring. Pure Python.

A task file has one JSON object per line:

- generation: `{"prompt": "...", "answer": "..."}`; the model's greedy completion is cut at the first
  stop string, the answer is extracted with `answer_pattern` (its first group; the whole completion
  when unset) and compared with the reference, as numbers when both read as numbers
  (`"1,000.0"` matches `"1000"`), else as trimmed strings.
- multiple choice: `{"prompt": "...", "choices": ["...", ...], "gold": 1}`; the model's choice is the one
  whose tokens it gives the highest log-likelihood after the prompt (`metric: acc_norm`: per character
  of the choice, as lm-eval's acc_norm).
- code: `{"prompt": "...", "tests": "assert f(1) == 2\n..."}`; the greedy completion (cut at stop strings,
  `answer_pattern` applied, e.g. to take a fenced block) is a program, with the prompt before it when
  `prompt_in_program` (HumanEval); it is correct when it runs with the tests appended and exits 0 in the
  sandbox (`evaluate.sandbox`): pass@1.
- lm_eval: one document per line in the columns of the lm-evaluation-harness task `lm_eval_task`,
  which builds the prompts and scores the answers (`evaluate.lm_eval_tasks`).

Multi-fidelity: the search split is shuffled once with the task's seed, and fidelity `n` means the first
`n` samples of that order. A trial evaluates a range `[start, end)` of it, so a promoted trial only sees
samples it has not seen, and counts from consecutive ranges add up exactly. The test split is held out:
it is a separate file, or a seeded share of the one file, and the search never reads it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Split = Literal["search", "test"]


class TaskSpec(BaseModel):
    """How to evaluate one task; the manifest's objectives carry these fields."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[
        str, Field(pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$", max_length=40, description="the task's name in reports")
    ]
    data: str = Field(min_length=1, description="JSONL of samples: a path, file:// or s3:// URI")
    test_data: str | None = Field(default=None, description="held-out JSONL; when unset, a seeded share of `data`")
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="share of `data` held out when no `test_data`")
    kind: Literal["generate", "multiple_choice", "code", "lm_eval"] = Field(
        default="generate",
        description="generate: exact match of a completion; multiple_choice: log-likelihood; code: the completion "
        "runs with the sample's tests in a sandbox (pass@1); lm_eval: an lm-evaluation-harness task (lm_eval_task) "
        "scores the documents in data",
    )
    prompt_in_program: bool = Field(
        default=False,
        description="kind code: the program is the prompt followed by the completion (HumanEval: the prompt is a "
        "signature and docstring); default: the completion alone (MBPP)",
    )
    program_timeout_seconds: float = Field(
        default=10, gt=0, le=600, description="kind code: wall time of one program with its tests (CPU: half)"
    )
    lm_eval_task: str | None = Field(
        default=None,
        min_length=1,
        description="kind lm_eval: the lm-evaluation-harness task (e.g. gsm8k) whose prompts, few-shot setup, "
        "filters and metric apply",
    )
    task_config: str | None = Field(
        default=None,
        min_length=1,
        description="kind lm_eval: a task YAML of your own defining lm_eval_task (path, file:// or s3://), "
        "instead of lm-eval's built-in; no !function, no include",
    )
    few_shot_data: str | None = Field(
        default=None, min_length=1, description="kind lm_eval: JSONL of the task's few-shot documents"
    )
    metric: str | None = Field(
        default=None,
        min_length=1,
        description="what counts a sample correct. kind lm_eval: lm-eval's 'metric,filter' (default: the task's "
        "first metric under its first filter, e.g. exact_match,strict-match); multiple_choice: acc (default) or "
        "acc_norm (log-likelihood per character of the choice)",
    )
    answer_pattern: str | None = Field(
        default=None, description="regex whose first group is the answer in a completion, e.g. 'The answer is: (.*)'"
    )
    few_shot: str = Field(default="", description="text put before every prompt (e.g. worked examples)")
    chat_template: bool = Field(default=False, description="wrap each prompt in the model's chat template")
    max_new_tokens: int = Field(default=64, ge=1, le=8192, description="longest completion (generation tasks)")
    stop: list[str] = Field(default_factory=list, description="strings that end a completion")
    seed: int = Field(default=0, description="seeds the search split's order and the test share")

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compiled = re.compile(value)
            except re.error as exc:
                raise ValueError(f"answer_pattern is not a valid regular expression: {exc}") from None
            if compiled.groups < 1:
                raise ValueError("answer_pattern needs one capturing group, e.g. 'The answer is: (.*)'")
        return value

    @model_validator(mode="after")
    def _fields_of_kind(self) -> TaskSpec:
        lm_eval_only = {
            "lm_eval_task": self.lm_eval_task,
            "task_config": self.task_config,
            "few_shot_data": self.few_shot_data,
        }
        if self.kind == "lm_eval":
            if self.lm_eval_task is None:
                raise ValueError("kind lm_eval needs lm_eval_task, the lm-evaluation-harness task to run (e.g. gsm8k)")
            # lm-eval's task config decides these; silently ignoring them would mislead.
            set_here = [
                name
                for name, value, default in (
                    ("answer_pattern", self.answer_pattern, None),
                    ("few_shot", self.few_shot, ""),
                    ("chat_template", self.chat_template, False),
                    ("stop", self.stop, []),
                    ("max_new_tokens", self.max_new_tokens, 64),
                )
                if value != default
            ]
            if set_here:
                raise ValueError(
                    f"{', '.join(set_here)} cannot be set with kind lm_eval: the lm-eval task's config decides its "
                    "prompts and generation (give your own as task_config)"
                )
            return self
        if given := [name for name, value in lm_eval_only.items() if value is not None]:
            raise ValueError(f"{', '.join(given)} only apply with kind lm_eval (set kind: lm_eval or remove them)")
        if self.kind != "code" and (self.prompt_in_program or self.program_timeout_seconds != 10):
            raise ValueError("prompt_in_program and program_timeout_seconds only apply with kind code")
        if self.metric is not None and not (self.kind == "multiple_choice" and self.metric in ("acc", "acc_norm")):
            raise ValueError(
                f"metric {self.metric!r}: a multiple_choice task takes acc or acc_norm, a generate task none"
            )
        return self

    def prompt(self, sample: Sample) -> str:
        return self.few_shot + sample.prompt


@dataclass(frozen=True)
class Sample:
    prompt: str = ""
    answer: str | None = None  # generation tasks
    choices: tuple[str, ...] = ()  # multiple-choice tasks
    gold: int | None = None
    tests: str | None = None  # code tasks: Python run after the program; it passes when it exits 0
    doc: Mapping[str, Any] | None = None  # lm_eval tasks: the document, in the task's columns


class TaskDataError(ValueError):
    """A task file that cannot be used; the message names the file, line and fix."""


def parse_samples(text: str, *, kind: str, source: str) -> list[Sample]:
    samples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise TaskDataError(f"{where}: not valid JSON ({exc})") from None
        if kind == "lm_eval":
            if not isinstance(row, dict):
                raise TaskDataError(f"{where}: each line must be an object, one document in the task's columns")
            samples.append(Sample(doc=row))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise TaskDataError(f'{where}: each line must be an object with a string "prompt"')
        if kind == "code":
            if not isinstance(row.get("tests"), str) or not row["tests"].strip():
                raise TaskDataError(f'{where}: a code sample needs "tests", Python that asserts the program works')
            samples.append(Sample(prompt=row["prompt"], tests=row["tests"]))
        elif kind == "generate":
            if isinstance(row.get("answer"), bool) or not isinstance(row.get("answer"), str | int | float):
                raise TaskDataError(f'{where}: a generation sample needs an "answer" (string or number)')
            samples.append(Sample(prompt=row["prompt"], answer=str(row["answer"])))
        else:
            choices, gold = row.get("choices"), row.get("gold")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise TaskDataError(f'{where}: a multiple-choice sample needs "choices", a list of 2 or more strings')
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise TaskDataError(f'{where}: "gold" must be the index of the right choice (0..{len(choices) - 1})')
            samples.append(Sample(prompt=row["prompt"], choices=tuple(choices), gold=gold))
    if not samples:
        raise TaskDataError(f"{source}: no samples")
    return samples


def split_samples(spec: TaskSpec, data: list[Sample], test_data: list[Sample] | None) -> dict[Split, list[Sample]]:
    """The search split in its seeded order (fidelity n = its first n) and the held-out test split."""
    if test_data is None:
        order = list(range(len(data)))
        random.Random(f"{spec.seed}:test-share").shuffle(order)
        held_out = max(1, round(spec.test_fraction * len(data)))
        test_indices = set(order[:held_out])
        test_data = [s for i, s in enumerate(data) if i in test_indices]
        data = [s for i, s in enumerate(data) if i not in test_indices]
    search = list(data)
    random.Random(f"{spec.seed}:search-order").shuffle(search)
    return {"search": search, "test": test_data}


def read_local_text(uri: str) -> str:
    """The text of a task file given as a local path or a file:// URI (remote URIs are the store's job)."""
    if "://" in uri and not uri.startswith("file://"):
        raise TaskDataError(f"{uri}: not a local file; fetch it first (only paths and file:// URIs are read here)")
    path = Path(uri.removeprefix("file://"))
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskDataError(f"{uri}: no such file") from None
    except UnicodeDecodeError as exc:
        raise TaskDataError(f"{uri}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_splits(spec: TaskSpec, *, read: Callable[[str], str] = read_local_text) -> dict[Split, list[Sample]]:
    """Read and parse the task's files with `read` (URI -> text) and split them (see `split_samples`)."""
    data = parse_samples(read(spec.data), kind=spec.kind, source=spec.data)
    test = parse_samples(read(spec.test_data), kind=spec.kind, source=spec.test_data) if spec.test_data else None
    return split_samples(spec, data, test)


def sample_range(samples: Sequence[Sample], start: int, end: int, *, task: str) -> list[Sample]:
    if not 0 <= start <= end <= len(samples):
        raise TaskDataError(f"task {task}: range [{start}, {end}) is outside its {len(samples)} search samples")
    return list(samples[start:end])


# Digits, or digits grouped by thousands ("1,000"; "1,2,3" is a list, not 123), then an optional fraction.
_NUMBER = re.compile(r"^[-+]?(\d+|\d{1,3}(,\d{3})+)?(\.\d+)?$")


def _as_number(text: str) -> float | None:
    cleaned = text.strip().rstrip(".").replace("$", "").strip()
    if not cleaned or not _NUMBER.match(cleaned) or not any(c.isdigit() for c in cleaned):
        return None
    try:
        return float(cleaned.replace(",", ""))
    except ValueError:
        return None


def cut_at_stop(completion: str, stop: Sequence[str]) -> str:
    positions = [completion.find(s) for s in stop if s and s in completion]
    return completion[: min(positions)] if positions else completion


def extract_answer(completion: str, spec: TaskSpec) -> str:
    completion = cut_at_stop(completion, spec.stop)
    if spec.answer_pattern is not None:
        match = re.search(spec.answer_pattern, completion)
        completion = (match.group(1) or "") if match else ""  # an optional group may match nothing
    # A program keeps its first line's indentation: a HumanEval completion continues a function's body.
    return completion.rstrip() if spec.kind == "code" else completion.strip()


def answers_match(predicted: str, reference: str) -> bool:
    """Numeric-aware exact match: numbers compare by value, anything else as trimmed strings."""
    left, right = _as_number(predicted), _as_number(reference)
    if left is not None and right is not None:
        return abs(left - right) <= 1e-6 * max(1.0, abs(right))
    return predicted.strip() == reference.strip()


@dataclass
class TaskCounts:
    """What a range of one task scored: add counts of consecutive ranges to get the whole prefix."""

    correct: int = 0
    evaluated: int = 0
    generated_tokens: int = 0

    def __add__(self, other: TaskCounts) -> TaskCounts:
        return TaskCounts(
            self.correct + other.correct,
            self.evaluated + other.evaluated,
            self.generated_tokens + other.generated_tokens,
        )

    @property
    def accuracy(self) -> float:
        return self.correct / self.evaluated if self.evaluated else 0.0
