"""Synthetic tasks of the tiny-model world: string reversal, sorting and a letter shift.

Each task is generated from a seed, so the data (and the models trained on it) are reproducible. A
sample is a prompt and its reference answer, the same shape as a user's JSONL generation task.
"""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "abcdefgh"

Sample = dict[str, str]


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def reverse(rng: random.Random) -> Sample:
    word = _letters(rng)
    return {"prompt": f"rev {word}=", "answer": word[::-1]}


def sort(rng: random.Random) -> Sample:
    word = _letters(rng)
    return {"prompt": f"srt {word}=", "answer": "".join(sorted(word))}


def shift(rng: random.Random) -> Sample:
    """Each letter moved one place on in the alphabet (h wraps to a)."""
    word = _letters(rng)
    return {"prompt": f"shf {word}=", "answer": "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in word)}


TASKS: dict[str, Callable[[random.Random], Sample]] = {"reverse": reverse, "sort": sort, "shift": shift}


def samples(task: str, count: int, seed: int) -> list[Sample]:
    """`count` samples of `task`, the same for the same seed."""
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(count)]
