"""Evaluation tasks: the JSONL format users write, splits, fidelity ranges, and scoring. Pure Python.

A task file has one JSON object per line:

- generation: `{"prompt": "...", "answer": "..."}`; the model's greedy completion is cut at the first
  stop string, the answer is extracted with `answer_pattern` (its first group; the whole completion
  when unset) and compared with the reference, as numbers when both read as numbers
  (`"1,000.0"` matches `"1000"`), else as trimmed strings.
- multiple choice: `{"prompt": "...", "choices": ["...", ...], "gold": 1}`; the model's choice is the one
  whose tokens it gives the highest log-likelihood after the prompt.

Multi-fidelity: the search split is shuffled once with the task's seed, and fidelity `n` means the first
`n` samples of that order. A trial evaluates a range `[start, end)` of it, so a promoted trial only sees
samples it has not seen, and counts from consecutive ranges add up exactly. The test split is held out:
it is a separate file, or a seeded share of the one file, and the search never reads it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    kind: Literal["generate", "multiple_choice"] = Field(
        default="generate", description="generate: exact match of a completion; multiple_choice: log-likelihood"
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

    def prompt(self, sample: Sample) -> str:
        return self.few_shot + sample.prompt


@dataclass(frozen=True)
class Sample:
    prompt: str
    answer: str | None = None  # generation tasks
    choices: tuple[str, ...] = ()  # multiple-choice tasks
    gold: int | None = None


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
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise TaskDataError(f'{where}: each line must be an object with a string "prompt"')
        if kind == "generate":
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
    if spec.answer_pattern is None:
        return completion.strip()
    match = re.search(spec.answer_pattern, completion)
    return (match.group(1) or "").strip() if match else ""  # an optional group may match nothing


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
