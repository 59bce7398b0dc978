"""Code objectives (MBPP / HumanEval style, pass@1): the completion is a program, its sample's tests decide.

The sandbox itself is tested against hostile programs in test_sandbox.py; here, how a code task turns
samples and completions into programs, and a real model writing code that the sandbox runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergesearch_trial_runner.evaluate.base import run_tests
from mergesearch_trial_runner.tasks import Sample, TaskDataError, TaskSpec, extract_answer, parse_samples

MBPP = TaskSpec(name="mbpp", data="d.jsonl", kind="code", program_timeout_seconds=5)
HUMANEVAL = MBPP.model_copy(update={"prompt_in_program": True})
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_a_completion_is_the_program_and_its_sample_s_tests_decide():
    sample = Sample(prompt="Write add(a, b).", tests=ADD_TESTS)
    programs = ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b", "def add(a, b) return"]
    assert run_tests(MBPP, [sample] * 3, programs) == [True, False, False]


def test_humaneval_style_the_completion_continues_the_prompt_s_function():
    sample = Sample(prompt='def add(a, b):\n    """The sum of a and b."""\n', tests=ADD_TESTS)
    completion = extract_answer(
        "    return a + b\n\n\ndef unrelated():", HUMANEVAL.model_copy(update={"stop": ["\ndef "]})
    )
    assert completion == "    return a + b"  # the body's indentation is kept
    assert run_tests(HUMANEVAL, [sample], [completion]) == [True]
    assert run_tests(MBPP, [sample], [completion]) == [False]  # without its prompt the body is no program


def test_a_hostile_completion_scores_zero_and_the_others_still_count(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    sample = Sample(prompt="Write add(a, b).", tests=ADD_TESTS)
    hostile = [
        "import os\nassert os.environ['AWS_SECRET_ACCESS_KEY'] == 's3cr3t'\ndef add(a, b):\n    return a + b",
        "while True:\n    pass",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef add(a, b):\n    return a + b",
    ]
    fast = MBPP.model_copy(update={"program_timeout_seconds": 2})
    assert run_tests(fast, [sample] * 4, [*hostile, "def add(a, b):\n    return a + b"]) == [False, False, False, True]


def test_a_code_sample_without_tests_is_refused_by_line(tmp_path):
    rows = [{"prompt": "Write f.", "tests": "assert f()"}, {"prompt": "Write g."}]
    with pytest.raises(TaskDataError, match=r"code.jsonl:2: a code sample needs \"tests\""):
        parse_samples("".join(json.dumps(r) + "\n" for r in rows), kind="code", source=str(tmp_path / "code.jsonl"))


def test_code_fields_only_apply_to_code_tasks():
    with pytest.raises(ValueError, match="prompt_in_program and program_timeout_seconds only apply with kind code"):
        TaskSpec(name="t", data="d.jsonl", prompt_in_program=True)


@pytest.mark.slow
@pytest.mark.reference
def test_smollm2_writes_functions_that_the_sandbox_runs(cache_dir: Path, tmp_path: Path):
    """A real instruct model, through the chat template, its fenced code block taken out and run."""
    from mergesearch_trial_runner.evaluate.registry import open_evaluator
    from mergesearch_trial_runner.testbed.smollm2 import export_smollm2

    model = export_smollm2(cache_dir / "smollm2-135m-instruct-bf16")
    functions = [
        ("add(a, b)", "returns the sum of a and b", "assert add(2, 3) == 5"),
        ("double(x)", "returns x times 2", "assert double(4) == 8"),
        ("is_even(n)", "returns True when n is even", "assert is_even(4) and not is_even(3)"),
        ("first(items)", "returns the first element of the list items", "assert first([7, 8]) == 7"),
        ("square(x)", "returns x squared", "assert square(3) == 9"),
        ("reverse(s)", "returns the string s reversed", "assert reverse('abc') == 'cba'"),
    ]
    rows = [
        {"prompt": f"Write a Python function {sig} that {what}. Reply with only the code.", "tests": tests}
        for sig, what, tests in functions
    ]
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskSpec(
        name="code",
        data=str(data),
        kind="code",
        chat_template=True,
        max_new_tokens=96,
        answer_pattern=r"(?s)```(?:python)?\n(.*?)(?:```|$)",
    )
    samples = parse_samples(data.read_text(), kind="code", source=str(data))
    with open_evaluator("hf", model=model, settings={"device": "cpu"}) as evaluator:
        results = evaluator.evaluate_samples(task=task, samples=samples)
    passed = [r.correct for r in results]
    assert any(passed), [r.completion for r in results]  # the model writes some of these right
    for result in results:  # and a program that passes is one that defines the function it was asked for
        if result.correct:
            assert "def " in result.prediction
