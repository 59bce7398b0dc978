"""lm-evaluation-harness tasks as objectives, against lm-eval's own `simple_evaluate` on the same merged model.

Real lm-eval, real task YAMLs and documents written here (a GSM8K-format generation task with its `####`
answers and regex filter, an MMLU-format multiple-choice task), a real merge of the tiny world's experts.
lm-eval's `hf` model is the reference: MergeSearch's counts must equal the ones it reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergesearch_trial_runner.tasks import TaskSpec, load_splits, parse_samples, read_local_text
from tests.evaluate.lm_eval_formats import GSM8K_FORMAT, MMLU_FORMAT, write_jsonl

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def merged(world, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linear merge of the world's three experts: a model that gets some documents right, not all."""
    from mergesearch_trial_runner.merge.engine import merge_to_directory
    from mergesearch_trial_runner.plan.ir import MergePlan

    experts = list(world.experts)
    plan = MergePlan.model_validate(
        {
            "models": {"base": str(world.model("base")), **{e: str(world.model(e)) for e in experts}},
            "base_model": "base",
            "slices": [
                {
                    "method": "linear",
                    "sources": [{"model": e, "layers": [0, 4], "params": {"weight": 1.0}} for e in experts],
                }
            ],
        }
    )
    out = tmp_path_factory.mktemp("merged") / "model"
    merge_to_directory(plan, out, model_dirs={"base": world.model("base"), **{e: world.model(e) for e in experts}})
    return out


def _documents(task: TaskSpec) -> list:
    return parse_samples(read_local_text(task.data), kind="lm_eval", source=task.data)


def _reference(model: Path, config: dict, documents: list, model_type: str = "hf", backend: str = ",dtype=float32"):
    """lm-eval's own numbers: its hf model on the same documents (in memory, as MergeSearch hands them)."""
    import datasets
    from lm_eval import simple_evaluate

    config = dict(config, test_split="test")
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([dict(d.doc) for d in documents])}
    )
    out = simple_evaluate(
        model=model_type, model_args=f"pretrained={model}{backend}", tasks=[config], device="cpu", batch_size=1
    )
    assert out is not None
    return out["results"][config["task"]]


@pytest.mark.parametrize(
    ("name", "metrics"),
    [("gsm", ["exact_match,strict-match", "exact_match,flexible-extract"]), ("mmlu", ["acc,none", "acc_norm,none"])],
)
def test_counts_equal_lm_evals_own_on_the_same_merged_model(merged, lm_tasks, name, metrics):
    from mergesearch_trial_runner.evaluate.registry import open_evaluator

    task = lm_tasks[name]
    documents = _documents(task)
    reference = _reference(merged, GSM8K_FORMAT if name == "gsm" else MMLU_FORMAT, documents)
    with open_evaluator("hf", model=merged, settings={"device": "cpu"}) as evaluator:
        for metric in metrics:
            counts = evaluator.evaluate(task=task.model_copy(update={"metric": metric}), samples=documents)
            assert counts.evaluated == len(documents)
            assert counts.correct == round(reference[metric] * len(documents)), (metric, counts, reference)
    assert 0 < reference[metrics[0]] < 1  # the merge gets some right and some wrong: the counts can disagree


def test_lm_eval_runs_mergesearch_backends_as_a_model_of_its_own(merged, lm_tasks):
    """Registered with lm-eval as the model `mergesearch`: lm-eval's entry point, a MergeSearch backend."""
    import mergesearch_trial_runner.evaluate.lm_eval_tasks  # noqa: F401 - registers the model

    documents = _documents(lm_tasks["gsm"])
    reference = _reference(merged, GSM8K_FORMAT, documents)
    ours = _reference(merged, GSM8K_FORMAT, documents, model_type="mergesearch", backend=",backend=hf,device=cpu")
    assert ours["exact_match,strict-match"] == reference["exact_match,strict-match"]


def test_consecutive_ranges_add_up_to_one_evaluation(merged, lm_tasks):
    """A promoted trial sees only new documents; its totals equal one evaluation at the top rung."""
    from mergesearch_trial_runner.evaluate.registry import open_evaluator

    task = lm_tasks["gsm"]
    search = load_splits(task)["search"]
    with open_evaluator("hf", model=merged, settings={"device": "cpu"}) as evaluator:
        rungs = [evaluator.evaluate(task=task, samples=search[a:b]) for a, b in ((0, 6), (6, 18), (18, 54))]
        whole = evaluator.evaluate(task=task, samples=search[:54])
    assert sum(r.correct for r in rungs) == whole.correct and whole.evaluated == 54
    assert 0 < whole.correct < 54


def test_random_few_shot_examples_depend_on_the_document_not_on_its_range(tmp_path):
    """lm-eval's built-in gsm8k draws 5 few-shot examples at random: per document here, so ranges add up."""
    from lm_eval.api.task import ConfigurableTask

    from mergesearch_trial_runner.evaluate.lm_eval_tasks import _per_document_few_shot, task_config

    train = [{"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}.\n#### {2 * i}"} for i in range(40)]
    task = TaskSpec(
        name="gsm",
        kind="lm_eval",
        lm_eval_task="gsm8k",
        data=write_jsonl(tmp_path / "test.jsonl", train[:3]),
        few_shot_data=write_jsonl(tmp_path / "train.jsonl", train),
    )
    contexts = []
    for order in ([0, 1, 2], [2, 1, 0]):
        import datasets

        config = task_config(task, read_local_text)
        config["custom_dataset"] = lambda **_: datasets.DatasetDict(
            {"test": datasets.Dataset.from_list(train[:3]), "train": datasets.Dataset.from_list(train)}
        )
        built = ConfigurableTask(config=config)
        built.set_fewshot_seed(1234)
        _per_document_few_shot(built)
        contexts.append({i: built.fewshot_context(train[i], num_fewshot=5) for i in order})
    assert contexts[0] == contexts[1]
    assert contexts[0][0] != contexts[0][1] and contexts[0][0].count("####") == 5


def test_a_builtin_task_runs_on_documents_from_a_file_never_a_hub(merged, tmp_path, monkeypatch):
    from mergesearch_trial_runner.evaluate.registry import open_evaluator

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"question": f"rev {w}=", "answer": f"#### {w[::-1]}"} for w in ("abc", "hgf", "cab", "bed", "fad")]
    task = TaskSpec(
        name="gsm8k", kind="lm_eval", lm_eval_task="gsm8k", data=write_jsonl(tmp_path / "t.jsonl", rows[:3]),
        few_shot_data=write_jsonl(tmp_path / "f.jsonl", rows[:4]),
    )  # fmt: skip
    with open_evaluator("hf", model=merged, settings={"device": "cpu"}) as evaluator:
        with pytest.raises(ValueError, match=r"f.jsonl: 4 documents, but task gsm8k puts 5 before every prompt"):
            evaluator.evaluate(task=task, samples=_documents(task))
        task = task.model_copy(update={"few_shot_data": write_jsonl(tmp_path / "f.jsonl", rows)})
        counts = evaluator.evaluate(task=task, samples=_documents(task))
    assert counts.evaluated == 3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "lm_eval"}, "kind lm_eval needs lm_eval_task"),
        ({"kind": "lm_eval", "lm_eval_task": "gsm8k", "answer_pattern": "(.*)"}, "answer_pattern cannot be set"),
        ({"lm_eval_task": "gsm8k"}, "lm_eval_task only apply with kind lm_eval"),
        ({"metric": "acc_norm"}, "a multiple_choice task takes acc or acc_norm, a generate task none"),
        ({"kind": "multiple_choice", "metric": "f1"}, "metric 'f1'"),
    ],
)
def test_fields_that_do_not_fit_the_kind_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec(name="t", data="d.jsonl", **fields)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("task: t\ndoc_to_text: !function utils.doc_to_text\n", "may not name Python functions"),
        ("task: t\ninclude: _default.yaml\n", "`include` is not followed"),
        ("task: other\n", "defines task 'other', but lm_eval_task is 't'"),
        ("task: t\noutput_type: loglikelihood_rolling\n", "output_type 'loglikelihood_rolling'"),
        ("task: t\nnum_fewshot: 3\n", "give their documents as few_shot_data"),
    ],
)
def test_task_configs_that_would_run_code_or_cannot_be_counted_are_refused(tmp_path, text, message):
    from mergesearch_trial_runner.evaluate.lm_eval_tasks import task_config

    (tmp_path / "t.yaml").write_text(text)
    task = TaskSpec(name="t", kind="lm_eval", lm_eval_task="t", task_config=str(tmp_path / "t.yaml"), data="d")
    with pytest.raises(ValueError, match=message):
        task_config(task, read_local_text)


def test_an_unknown_builtin_task_is_named():
    from mergesearch_trial_runner.evaluate.lm_eval_tasks import task_config

    task = TaskSpec(name="t", kind="lm_eval", lm_eval_task="gsm8k_typo", data="d")
    with pytest.raises(ValueError, match="'gsm8k_typo' is not a task of lm-eval"):
        task_config(task, read_local_text)


def test_acc_norm_of_a_jsonl_task_ranks_choices_per_character(world, choice_task):
    """lm-eval's acc_norm on MergeSearch's own multiple-choice format: the choice's log-likelihood per
    character. Checked against the per-choice log-likelihoods the evaluator reports."""
    from mergesearch_trial_runner.evaluate.registry import open_evaluator

    samples = load_splits(choice_task)["search"][:40]
    norm = choice_task.model_copy(update={"metric": "acc_norm"})
    with open_evaluator("hf", model=world.model("reverse"), settings={"device": "cpu"}) as evaluator:
        results = evaluator.evaluate_samples(task=norm, samples=samples)
    for sample, result in zip(samples, results, strict=True):
        per_char = [lp / len(c) for lp, c in zip(result.choice_logprobs, sample.choices, strict=True)]
        assert int(result.prediction) == max(range(len(per_char)), key=lambda i: (per_char[i], -i))


def test_a_trial_reads_the_task_from_s3_and_its_rungs_add_up(world, lm_tasks, s3_server, monkeypatch, tmp_path):
    """Through the trial runner, as a pod runs it: documents and task YAML on S3, three rungs' ranges and
    one range over all of them give the same totals."""
    from mergesearch_trial_runner.cli import run_trial
    from mergesearch_trial_runner.spec import TrialSpec
    from tests.runner.runs import reverse_trial

    for name, value in s3_server.env(AWS_EC2_METADATA_DISABLED="true").items():
        monkeypatch.setenv(name, value)
    bucket = "lm-eval-tasks"
    s3_server.create_bucket(bucket)
    client = s3_server.client()
    local = lm_tasks["gsm"]
    for key, path in (("gsm.jsonl", local.data), ("gsm.yaml", local.task_config)):
        client.put_object(Bucket=bucket, Key=key, Body=Path(str(path)).read_bytes())
    task = local.model_copy(update={"data": f"s3://{bucket}/gsm.jsonl", "task_config": f"s3://{bucket}/gsm.yaml"})
    base = reverse_trial(world, tmp_path)

    def run(start: int, end: int) -> tuple[int, int]:
        spec = TrialSpec.model_validate(
            {**base.model_dump(), "name": f"r{start}", "tasks": [task.model_dump()], "ranges": {"gsm": (start, end)}}
        )
        result = run_trial(spec)
        assert result.ok, result.message
        return result.tasks["gsm"].correct, result.tasks["gsm"].evaluated

    rungs = [run(a, b) for a, b in ((0, 6), (6, 18), (18, 54))]
    assert tuple(map(sum, zip(*rungs, strict=True))) == run(0, 54)


@pytest.mark.slow
@pytest.mark.reference
def test_smollm2_counts_equal_lm_evals_own(cache_dir: Path, tmp_path: Path):
    """A real pretrained LLM: GSM8K-format arithmetic (lm-eval's gsm8k prompt and flexible-extract filter)
    and MMLU-format multiple choice, zero-shot, float32 on both sides."""
    from mergesearch_trial_runner.evaluate.registry import open_evaluator
    from mergesearch_trial_runner.testbed.smollm2 import export_smollm2

    model = export_smollm2(cache_dir / "smollm2-135m-instruct-bf16")
    pairs = [(a, b) for a in (3, 12, 25, 7, 40, 9) for b in (4, 15, 8, 30)][:24]
    gsm_config = {
        **GSM8K_FORMAT,
        "task": "smol_gsm8k_format",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "generation_kwargs": {"until": ["Question:", "\n\n"], "max_gen_toks": 16, "do_sample": False},
        "filter_list": [
            {
                "name": "flexible-extract",
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                    {"function": "take_first"},
                ],
            }
        ],
    }
    mmlu_config = {**MMLU_FORMAT, "task": "smol_mmlu_format", "doc_to_text": "Question: {{question}}\nAnswer:"}
    mmlu_config["target_delimiter"] = " "
    gsm = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in pairs]
    mmlu = [
        {"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b), str(abs(a - b))],
         "answer": 0}
        for a, b in pairs
    ]  # fmt: skip
    for config, rows, metric in ((gsm_config, gsm, "exact_match,flexible-extract"), (mmlu_config, mmlu, "acc,none")):
        (tmp_path / "t.yaml").write_text(yaml.safe_dump(config))
        task = TaskSpec(
            name="t", kind="lm_eval", lm_eval_task=config["task"], task_config=str(tmp_path / "t.yaml"),
            data=write_jsonl(tmp_path / "t.jsonl", rows), metric=metric,
        )  # fmt: skip
        documents = _documents(task)
        reference = _reference(model, config, documents)
        with open_evaluator("hf", model=model, settings={"device": "cpu", "dtype": "float32"}) as evaluator:
            counts = evaluator.evaluate(task=task, samples=documents)
        assert counts.correct == round(reference[metric] * len(documents)), (metric, counts, reference)
        assert 0 < counts.correct < len(documents), (metric, counts)


def test_lm_evals_task_index_is_built_once_per_machine(tmp_path, monkeypatch):
    """Building lm-eval's index of its built-in tasks takes seconds: a trial process reads it from disk."""
    from mergesearch_trial_runner.evaluate import lm_eval_tasks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = lm_eval_tasks._task_index()
    assert first["gsm8k"].endswith("gsm8k.yaml") and len(list((tmp_path / "mergesearch").iterdir())) == 1

    def no_index(*args, **kwargs):
        raise AssertionError("the index was built again")

    monkeypatch.setattr(lm_eval_tasks, "TaskManager", no_index)
    assert lm_eval_tasks._task_index() == first
