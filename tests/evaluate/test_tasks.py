"""The task format, splits, fidelity ranges and scoring (tasks.py): pure Python, no model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from mergesearch_trial_runner.tasks import (
    Sample,
    TaskCounts,
    TaskDataError,
    TaskSpec,
    answers_match,
    cut_at_stop,
    extract_answer,
    load_splits,
    parse_samples,
    sample_range,
    split_samples,
)


def spec(**fields) -> TaskSpec:
    return TaskSpec(**{"name": "t", "data": "unused.jsonl", **fields})


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("1,000.0", "1000"),
        ("$1,234.50", "1234.5"),
        ("42.", "42"),
        (" 7 ", "7"),
        ("-0.5", "-.5"),
        ("+3", "3"),
        ("0.30000000000000004", "0.3"),
        ("cba", " cba "),
    ],
)
def test_answers_that_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("1,2,3", "123"),  # a list, not a number with thousands separators
        ("12,34", "1234"),
        ("1001", "1000"),
        ("abc", "ABC"),
        ("", "0"),
        ("4 apples", "4"),
    ],
)
def test_answers_that_do_not_match(predicted, reference):
    assert not answers_match(predicted, reference)


def test_answer_pattern_takes_its_first_group_and_gives_empty_when_absent():
    task = spec(answer_pattern=r"The answer is:? *(-?[\d,.]+)")
    assert extract_answer("Let me think. The answer is: 1,000.", task) == "1,000."
    assert answers_match(extract_answer("Let me think. The answer is: 1,000.", task), "1000")
    assert extract_answer("no idea", task) == ""


def test_an_optional_group_that_matched_nothing_gives_empty():
    assert extract_answer("nothing", spec(answer_pattern=r"(?:answer: (\d+))?")) == ""


def test_answer_pattern_must_compile_and_have_a_group():
    with pytest.raises(ValueError, match="capturing group"):
        spec(answer_pattern=r"answer: \d+")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        spec(answer_pattern=r"answer: (\d+")


def test_stop_strings_cut_at_the_earliest_before_extraction():
    assert cut_at_stop("abc\nQ: next\n\nmore", ["\n\n", "\nQ:"]) == "abc"
    assert cut_at_stop("abc", ["", "zz"]) == "abc"
    task = spec(stop=["\nQ:"], answer_pattern=r"answer: (\d+)")
    assert extract_answer("answer: 12\nQ: answer: 99", task) == "12"
    assert extract_answer("\nQ: answer: 99", task) == ""


def test_generation_and_multiple_choice_lines_parse():
    text = '{"prompt": "rev ab=", "answer": "ba"}\n\n{"prompt": "2+2=", "answer": 4}\n'
    assert parse_samples(text, kind="generate", source="f") == [
        Sample(prompt="rev ab=", answer="ba"),
        Sample(prompt="2+2=", answer="4"),
    ]
    mc = '{"prompt": "q", "choices": ["a", "b"], "gold": 1}'
    assert parse_samples(mc, kind="multiple_choice", source="f") == [Sample(prompt="q", choices=("a", "b"), gold=1)]


@pytest.mark.parametrize(
    ("kind", "line", "message"),
    [
        ("generate", '{"prompt": "x", "answer": "y"', "not valid JSON"),
        ("generate", '["prompt", "x"]', 'string "prompt"'),
        ("generate", '{"prompt": 3, "answer": "y"}', 'string "prompt"'),
        ("generate", '{"prompt": "x"}', 'needs an "answer"'),
        ("generate", '{"prompt": "x", "answer": true}', 'needs an "answer"'),
        ("multiple_choice", '{"prompt": "x", "choices": ["a"], "gold": 0}', "2 or more strings"),
        ("multiple_choice", '{"prompt": "x", "choices": ["a", 2], "gold": 0}', "2 or more strings"),
        ("multiple_choice", '{"prompt": "x", "choices": ["a", "b"], "gold": 2}', r"index of the right choice \(0..1\)"),
        ("multiple_choice", '{"prompt": "x", "choices": ["a", "b"], "gold": true}', "index of the right choice"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line(kind, line, message):
    good = {
        "generate": '{"prompt": "p", "answer": "a"}',
        "multiple_choice": '{"prompt": "p", "choices": ["a", "b"], "gold": 0}',
    }[kind]
    text = f"{good}\n\n{line}\n{good}\n"
    with pytest.raises(TaskDataError, match=rf"^tasks/x\.jsonl:3: .*{message}"):
        parse_samples(text, kind=kind, source="tasks/x.jsonl")


def test_a_file_without_samples_is_refused():
    with pytest.raises(TaskDataError, match=r"^empty\.jsonl: no samples"):
        parse_samples("\n  \n", kind="generate", source="empty.jsonl")


def test_load_splits_reads_paths_and_file_uris_and_names_missing_files(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(10)])
    test = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "held", "answer": "out"}])
    splits = load_splits(spec(data=f"file://{data}", test_data=test))
    assert sorted(s.prompt for s in splits["search"]) == sorted(f"p{i}" for i in range(10))
    assert splits["test"] == [Sample(prompt="held", answer="out")]
    with pytest.raises(TaskDataError, match="no such file"):
        load_splits(spec(data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(TaskDataError, match="not a local file"):
        load_splits(spec(data="s3://bucket/tasks.jsonl"))


def numbered(count: int) -> list[Sample]:
    return [Sample(prompt=f"p{i}", answer=str(i)) for i in range(count)]


def test_held_out_share_is_disjoint_from_search_and_covers_the_file():
    data = numbered(500)
    splits = split_samples(spec(test_fraction=0.2), data, None)
    search, test = {s.prompt for s in splits["search"]}, {s.prompt for s in splits["test"]}
    assert len(test) == 100 and len(search) == 400
    assert not search & test
    assert search | test == {s.prompt for s in data}


def test_split_is_seeded_and_the_seed_changes_it():
    data = numbered(300)
    first, again = split_samples(spec(seed=4), data, None), split_samples(spec(seed=4), data, None)
    assert first == again
    other = split_samples(spec(seed=5), data, None)
    assert other["search"] != first["search"] and other["test"] != first["test"]


def test_a_separate_test_file_leaves_all_data_to_search_in_a_seeded_order():
    data, held = numbered(200), [Sample(prompt="held", answer="x")]
    splits = split_samples(spec(seed=1), data, held)
    assert splits["test"] == held
    assert sorted(s.prompt for s in splits["search"]) == sorted(s.prompt for s in data)
    assert splits["search"] != data  # shuffled once, with the seed


def test_fidelity_prefixes_are_nested_and_consecutive_ranges_add_up():
    order = split_samples(spec(seed=2), numbered(1000), None)["search"]
    fidelities = [100, 300, 800]
    prefixes = [sample_range(order, 0, n, task="t") for n in fidelities]
    for small, large in itertools.pairwise(prefixes):
        assert large[: len(small)] == small
    # a promoted trial evaluates only what it has not seen: [0, 100) + [100, 300) + [300, 800) = [0, 800)
    pieces = [sample_range(order, a, b, task="t") for a, b in zip([0, *fidelities], fidelities, strict=False)]
    assert [s for piece in pieces for s in piece] == prefixes[-1]


def test_a_range_outside_the_split_is_refused():
    with pytest.raises(TaskDataError, match=r"task t: range \[90, 120\) is outside its 100 search samples"):
        sample_range(numbered(100), 90, 120, task="t")
    with pytest.raises(TaskDataError):
        sample_range(numbered(100), 50, 40, task="t")


def test_counts_add_and_give_accuracy():
    total = TaskCounts(3, 10, 40) + TaskCounts(5, 10, 35)
    assert total == TaskCounts(correct=8, evaluated=20, generated_tokens=75)
    assert total.accuracy == 0.4
    assert TaskCounts().accuracy == 0.0
