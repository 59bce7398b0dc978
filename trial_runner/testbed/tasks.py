"""Synthetic tasks of the tiny-model world: string reversal, sorting and a letter shift (and copying,
which no objective measures).

Each task is generated from a seed, so the data (and the models trained on it) are reproducible. A
sample is a prompt and its reference answer, the same shape as a user's JSONL generation task.
"""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "abcdefgh"

Sample = dict[str, str]


def _letters(rng: random.Random, letters: str) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))


def reverse(rng: random.Random, letters: str) -> Sample:
    word = _letters(rng, letters)
    return {"prompt": f"rev {word}=", "answer": word[::-1]}


def sort(rng: random.Random, letters: str) -> Sample:
    word = _letters(rng, letters)
    return {"prompt": f"srt {word}=", "answer": "".join(sorted(word))}


def shift(rng: random.Random, letters: str) -> Sample:
    """Each letter moved one place on in the alphabet (the last wraps to the first)."""
    word = _letters(rng, letters)
    return {"prompt": f"shf {word}=", "answer": "".join(letters[(letters.index(c) + 1) % len(letters)] for c in word)}


def copy(rng: random.Random, letters: str) -> Sample:
    word = _letters(rng, letters)
    return {"prompt": f"cpy {word}=", "answer": word}


TASKS: dict[str, Callable[[random.Random, str], Sample]] = {"reverse": reverse, "sort": sort, "shift": shift}
# Tasks an expert may be fine-tuned on that no objective measures, as a user's pool of fine-tunes holds
# some that help nothing they evaluate.
OFF_OBJECTIVE_TASKS: dict[str, Callable[[random.Random, str], Sample]] = {"copy": copy}


def samples(task: str, count: int, seed: int, letters: str) -> list[Sample]:
    """`count` samples of `task` over `letters`, the same for the same seed."""
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng, letters) for _ in range(count)]
