"""The hf backend on the tiny-model world: skill where there should be, ranges, in-memory merges, choices."""

from __future__ import annotations

import pytest

from mergesearch_trial_runner.evaluate import InMemoryModel, TaskModelError, open_evaluator
from mergesearch_trial_runner.merge.engine import merge_to_directory, merge_to_state_dict
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.tasks import TaskCounts, load_splits, sample_range


def search(task, start: int, end: int):
    return sample_range(load_splits(task)["search"], start, end, task=task.name)


@pytest.fixture(scope="module")
def reverse_expert(world):
    with open_evaluator("hf", model=world.model("reverse")) as evaluator:
        yield evaluator


@pytest.mark.parametrize("name", ["reverse", "sort", "shift"])
def test_an_expert_masters_its_task_and_beats_the_base(world, tasks, name):
    task, samples = tasks[name], search(tasks[name], 0, 100)
    with (
        open_evaluator("hf", model=world.model(name)) as expert,
        open_evaluator("hf", model=world.model("base")) as base,
    ):
        mine, baseline = expert.evaluate(task=task, samples=samples), base.evaluate(task=task, samples=samples)
    assert mine.evaluated == 100 and mine.accuracy > 0.8
    assert mine.accuracy > baseline.accuracy
    # every completion ends with its end-of-sequence token: answers of 3-6 characters, plus one
    assert 4 * 100 <= mine.generated_tokens <= 7 * 100


def test_consecutive_ranges_add_up_to_their_union(reverse_expert, tasks, choice_task):
    for task in (tasks["reverse"], tasks["sort"], choice_task):
        halves = [reverse_expert.evaluate(task=task, samples=search(task, a, b)) for a, b in ((0, 50), (50, 100))]
        whole = reverse_expert.evaluate(task=task, samples=search(task, 0, 100))
        assert halves[0] + halves[1] == whole


def test_an_empty_range_counts_nothing(reverse_expert, tasks):
    assert reverse_expert.evaluate(task=tasks["reverse"], samples=[]) == TaskCounts()


def test_multiple_choice_picks_the_reversal(world, reverse_expert, choice_task):
    samples = search(choice_task, 0, 150)
    counts = reverse_expert.evaluate(task=choice_task, samples=samples)
    assert counts.evaluated == 150 and counts.generated_tokens == 0
    assert counts.accuracy > 0.9
    results = reverse_expert.evaluate_samples(task=choice_task, samples=samples[:5])
    assert all(len(r.choice_logprobs) == 3 and max(r.choice_logprobs) < 0 for r in results)
    assert [r.prediction for r in results] == [str(max(range(3), key=r.choice_logprobs.__getitem__)) for r in results]


def test_stop_strings_end_generation_and_cut_the_answer(reverse_expert, tasks):
    plain, stopped = tasks["reverse"], tasks["reverse"].model_copy(update={"stop": ["b"]})
    samples = search(plain, 0, 100)
    before = reverse_expert.evaluate_samples(task=plain, samples=samples)
    after = reverse_expert.evaluate_samples(task=stopped, samples=samples)
    for full, cut in zip(before, after, strict=True):
        if "b" in full.completion:
            # generation stopped at the token that wrote the first "b"; the answer is what came before it
            assert cut.completion == full.completion[: full.completion.index("b") + 1]
            assert cut.generated_tokens == full.completion.index("b") + 1
            assert cut.prediction == full.completion[: full.completion.index("b")]
        else:
            assert cut == full


def test_a_prompt_longer_than_the_context_is_a_task_model_error(reverse_expert, tasks):
    task = tasks["reverse"].model_copy(update={"few_shot": "rev abcdef=fedcba\n" * 4})
    with pytest.raises(TaskModelError, match=r"task reverse, sample 0 of the range: the prompt has \d+ tokens"):
        reverse_expert.evaluate(task=task, samples=search(task, 0, 3))


def test_a_closed_evaluator_refuses_work_and_closes_again_quietly(world, tasks):
    evaluator = open_evaluator("hf", model=world.model("base"))
    evaluator.close()
    evaluator.close()
    with pytest.raises(RuntimeError, match="closed"):
        evaluator.evaluate(task=tasks["reverse"], samples=search(tasks["reverse"], 0, 1))


def test_a_merge_in_memory_evaluates_exactly_like_its_written_directory(world, tasks, choice_task, tmp_path):
    dirs = {name: world.model(name) for name in ("base", "reverse", "sort", "shift")}
    layers = [0, 4]
    plan = MergePlan.model_validate(
        {
            "models": {k: str(v) for k, v in dirs.items()},
            "base_model": "base",
            "slices": [
                {
                    "method": "ties",
                    "base": {"model": "base", "layers": layers},
                    "sources": [
                        {"model": m, "layers": layers, "params": {"weight": 0.5, "density": 0.5}}
                        for m in ("reverse", "sort", "shift")
                    ],
                }
            ],
        }
    )
    merge_to_directory(plan, tmp_path / "merged", model_dirs=dirs)
    in_memory = InMemoryModel(*merge_to_state_dict(plan, model_dirs=dirs))
    for task in (tasks["reverse"], tasks["shift"], choice_task):
        samples = search(task, 0, 60)
        with open_evaluator("hf", model=in_memory) as memory, open_evaluator("hf", model=tmp_path / "merged") as disk:
            assert memory.evaluate_samples(task=task, samples=samples) == disk.evaluate_samples(
                task=task, samples=samples
            )


def test_rows_that_end_early_leave_the_batch_without_changing_any_answer(world, tasks):
    """The base model's answers end at many different lengths, so a batch of 64 drops ended rows (and
    their cache) several times; every completion must still be what a batch of one decodes."""
    task, samples = tasks["shift"], search(tasks["shift"], 0, 64)
    by_batch = {}
    for batch_size in (64, 1):
        with open_evaluator("hf", model=world.model("base"), settings={"batch_size": batch_size}) as evaluator:
            by_batch[batch_size] = evaluator.evaluate_samples(task=task, samples=samples)
    lengths = sorted(r.generated_tokens for r in by_batch[64])
    assert lengths[len(lengths) // 2] < lengths[-1], "answers of one length: nothing would leave the batch"
    assert [r.completion for r in by_batch[64]] == [r.completion for r in by_batch[1]]
