"""Task specs over the tiny-model world, shared by the hf and vllm tests: the same tasks for both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergesearch_trial_runner.tasks import TaskSpec, load_splits
from mergesearch_trial_runner.testbed.tasks import TASKS
from tests.evaluate.lm_eval_formats import GSM8K_FORMAT, MMLU_FORMAT, write_jsonl

# Answers are at most 6 characters and an end-of-sequence token; 16 leaves room for a wrong model to ramble.
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="session")
def tasks(world) -> dict[str, TaskSpec]:
    """The world's generation tasks, search and test splits from their own files."""
    return {
        name: TaskSpec(
            name=name,
            data=str(world.split(name, "search")),
            test_data=str(world.split(name, "test")),
            max_new_tokens=MAX_NEW_TOKENS,
        )
        for name in TASKS
    }


@pytest.fixture(scope="session")
def choice_task(world, tmp_path_factory: pytest.TempPathFactory) -> TaskSpec:
    """Multiple choice made by hand from the reverse task: the reversal, the word itself, the word sorted.

    Words whose three candidates are not all different (palindromes, sorted words) are left out; the
    right answer's position rotates so that always picking one position scores a third.
    """
    rows = []
    for sample in load_splits(TaskSpec(name="reverse", data=str(world.split("reverse", "search"))))["search"]:
        assert sample.answer is not None
        word = sample.answer[::-1]
        candidates = [sample.answer, word, "".join(sorted(word))]
        if len(set(candidates)) < 3:
            continue
        gold = len(rows) % 3
        choices = candidates[1:]
        choices.insert(gold, candidates[0])
        rows.append({"prompt": sample.prompt, "choices": choices, "gold": gold})
    path: Path = tmp_path_factory.mktemp("choice") / "reverse-choice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TaskSpec(name="reverse-choice", data=str(path), kind="multiple_choice", test_fraction=0.1)


@pytest.fixture(scope="session")
def lm_tasks(world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TaskSpec]:
    """lm_eval objectives over the tiny world's reversal: GSM8K-format generation, MMLU-format choice."""
    root = tmp_path_factory.mktemp("lm-eval")
    words = [s.answer for s in load_splits(TaskSpec(name="r", data=str(world.split("reverse", "test"))))["test"]][:60]
    assert all(words)
    gsm = [{"question": f"rev {w[::-1]}=", "answer": f"Reversed, it reads {w}.\n#### {w}"} for w in words]
    mmlu = []
    for index, word in enumerate(words):
        # Near misses (the input unreversed, two letters swapped, one letter more): the merge confuses some.
        candidates = [word, word[::-1], word[1] + word[0] + word[2:], word + word[-1]]
        gold = index % 4
        choices = candidates[1:]
        choices.insert(gold, candidates[0])
        mmlu.append({"question": f"rev {word[::-1]}=", "choices": choices, "answer": gold})
    (root / "gsm.yaml").write_text(yaml.safe_dump(GSM8K_FORMAT))
    (root / "mmlu.yaml").write_text(yaml.safe_dump(MMLU_FORMAT))
    common = {"kind": "lm_eval", "test_fraction": 0.1}
    return {
        "gsm": TaskSpec(
            name="gsm",
            data=write_jsonl(root / "gsm.jsonl", gsm),
            lm_eval_task=GSM8K_FORMAT["task"],
            task_config=str(root / "gsm.yaml"),
            **common,
        ),
        "mmlu": TaskSpec(
            name="mmlu",
            data=write_jsonl(root / "mmlu.jsonl", mmlu),
            lm_eval_task=MMLU_FORMAT["task"],
            task_config=str(root / "mmlu.yaml"),
            **common,
        ),
    }
