"""lm-evaluation-harness tasks as objectives: lm-eval builds the requests, filters and scores; a
MergeSearch evaluator answers them.

A task of `kind: lm_eval` names an lm-eval task (`lm_eval_task`): its prompt format, few-shot setup,
generation settings, filters and metrics come from lm-eval's own task config, so a score is the number a
user gets from `lm_eval` on the same model. What MergeSearch changes, and why:

- Documents never come from a hub. The task's documents are the objective's `data` (JSONL, one document
  per line, in the task's own columns), split and ranged as any objective's samples are; few-shot
  documents come from `few_shot_data`. Both are handed to lm-eval in memory (`custom_dataset`).
- A task is lm-eval's built-in (found through lm-eval's task index, kept on disk per machine) or the YAML at
  `task_config`. A YAML of the user's is read with `yaml.safe_load`: it may not name Python functions
  (`!function`), since trials run no code from task files; `include` is not followed.
- Few-shot examples drawn at random are drawn per document (seeded by the document's content), so a
  document's prompt is the same whichever range it is evaluated in, and counts of consecutive ranges add
  up. `lm_eval` itself draws them in evaluation order: with a random few-shot sampler its prompts, and
  so its scores, can differ slightly; with zero-shot or `sampler: first_n` (MMLU's) they are the same.
- A document counts as correct when its per-document value of the objective's `metric` (default: the
  task's first metric under its first filter, e.g. `exact_match,strict-match`) is 1; metrics whose
  per-document values are not 0 or 1 (BLEU, F1) cannot be counted and are refused.
- Requests are answered by the trial's evaluator (`EvaluatorLM`, registered with lm-eval as the model
  `mergesearch`): `generate_until` through its greedy generation, `loglikelihood` through its
  continuation log-likelihood, tokenized as lm-eval's `hf` model tokenizes (`TemplateLM`). Tasks of
  output type `loglikelihood` (whose accuracy needs greedy-match flags) and `loglikelihood_rolling`
  (perplexity) are refused: neither is a 0/1 score per document.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import lm_eval.models  # noqa: F401 - lm-eval's own models first: it adds them only to an empty registry
import numpy
import torch
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.api.task import ConfigurableTask
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from ..tasks import Sample, TaskDataError, TaskSpec, parse_samples
from .base import SampleResult
from .prompts import ContinuationRequest, GenerationRequest, TaskModelError

if TYPE_CHECKING:
    from .base import Evaluator

# lm-eval's own defaults (`simple_evaluate`), so that prompts and scores match `lm_eval` run as users run it.
RANDOM_SEED = 0
OTHER_SEED = 1234
SUPPORTED_OUTPUT_TYPES = ("generate_until", "multiple_choice")


@functools.cache
def builtin_config_path(name: str) -> str:
    """The YAML of lm-eval's built-in task `name`. lm-eval's task index takes seconds to build (it reads
    every task YAML), so its name -> path map is kept on disk per lm-eval version, once per machine."""
    entry = _task_index().get(name)
    if entry is None:
        raise TaskModelError(
            f"lm_eval_task {name!r} is not a task of lm-eval {metadata.version('lm_eval')}; name one that "
            "`lm_eval ls tasks` lists, or give its YAML as task_config"
        )
    return entry


def _task_index() -> dict[str, str]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mergesearch"
    path = cache / f"lm-eval-{metadata.version('lm_eval')}-task-index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    index = {name: str(e.yaml_path) for name, e in TaskManager().task_index.items() if getattr(e, "yaml_path", None)}
    try:  # a read-only home (some pods) only costs the next process the index again
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(index))
        partial.replace(path)
    except OSError:
        pass
    return index


def task_config(task: TaskSpec, read: Callable[[str], str]) -> dict[str, Any]:
    """lm-eval's config of the objective's task, its dataset replaced by nothing (documents come later)."""
    name = task.lm_eval_task
    assert name is not None
    if task.task_config is None:
        config = load_yaml(builtin_config_path(name))
    else:
        config = _user_config(task.task_config, read(task.task_config), name)
    output_type = config.get("output_type", "generate_until")
    if output_type not in SUPPORTED_OUTPUT_TYPES:
        raise TaskModelError(
            f"lm_eval_task {name!r} has output_type {output_type!r}; objectives count correct documents, which "
            f"lm-eval tasks of output_type {' or '.join(SUPPORTED_OUTPUT_TYPES)} give"
        )
    for key in ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split"):
        config.pop(key, None)
    config["test_split"] = "test"
    if task.few_shot_data is not None:
        config["fewshot_split"] = "train"
    else:
        config.pop("fewshot_split", None)
        if config.get("num_fewshot"):
            raise TaskModelError(
                f"lm_eval_task {name!r} uses {config['num_fewshot']} few-shot examples; give their documents as "
                "few_shot_data (JSONL in the task's columns)"
            )
    config["task"] = name
    return config


def _user_config(uri: str, text: str, name: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        raise TaskDataError(
            f"{uri}: {exc.problem} ({exc.problem_mark}); task_config may not name Python functions (!function): "
            "trials run no code from task files; use Jinja templates (doc_to_text, doc_to_target)"
        ) from None
    except yaml.YAMLError as exc:
        raise TaskDataError(f"{uri}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise TaskDataError(f"{uri}: a task YAML is a mapping of lm-eval's task fields")
    if "include" in config:
        raise TaskDataError(f"{uri}: `include` is not followed; write the whole task in one file")
    if config.get("task") != name:
        raise TaskDataError(f"{uri}: defines task {config.get('task')!r}, but lm_eval_task is {name!r}")
    return config


def metric_key(task: TaskSpec, config: dict[str, Any]) -> tuple[str, str]:
    """(metric, filter) whose per-document value decides whether a document is correct."""
    if task.metric is not None:
        metric, _, filter_name = task.metric.partition(",")
        return metric, filter_name or "none"
    metrics = config.get("metric_list") or [{"metric": "acc" if config.get("output_type") == "multiple_choice" else ""}]
    filters = config.get("filter_list") or [{"name": "none"}]
    return str(metrics[0]["metric"]), str(filters[0]["name"])


def _document_seed(document: dict[str, Any]) -> int:
    digest = hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).digest()
    return OTHER_SEED ^ int.from_bytes(digest[:8], "big")


def _per_document_few_shot(lm_task: Any) -> None:
    """Draw each document's random few-shot examples from a seed of its own (see the module's doc)."""
    sampler = getattr(lm_task, "sampler", None)
    if sampler is None or not hasattr(sampler, "rnd"):
        return
    original = lm_task.fewshot_context

    def fewshot_context(doc: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        sampler.rnd = random.Random(_document_seed(doc))
        return original(doc, *args, **kwargs)

    lm_task.fewshot_context = fewshot_context


def score_documents(
    evaluator: Evaluator, task: TaskSpec, samples: Sequence[Sample], *, read: Callable[[str], str]
) -> list[SampleResult]:
    """Each document's result: lm-eval builds the requests, filters the answers and scores them."""
    if not samples:
        return []
    config = task_config(task, read)
    documents = [dict(s.doc or {}) for s in samples]
    few_shot = (
        [dict(s.doc or {}) for s in parse_samples(read(task.few_shot_data), kind="lm_eval", source=task.few_shot_data)]
        if task.few_shot_data is not None
        else []
    )
    if len(few_shot) < int(config.get("num_fewshot") or 0):
        raise TaskDataError(
            f"{task.few_shot_data}: {len(few_shot)} documents, but task {task.lm_eval_task} puts "
            f"{config['num_fewshot']} before every prompt; give at least that many"
        )
    splits = {"test": datasets.Dataset.from_list(documents)}
    if few_shot:
        splits["train"] = datasets.Dataset.from_list(few_shot)
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(splits)
    lm_task = ConfigurableTask(config=config)
    _per_document_few_shot(lm_task)
    metric, filter_name = metric_key(task, config)
    # What lm-eval's `simple_evaluate` does around `evaluate`, without its environment report (it runs
    # `pip list` and friends: 0.3 s of every call).
    random.seed(RANDOM_SEED)
    numpy.random.seed(OTHER_SEED)
    torch.manual_seed(OTHER_SEED)
    loaded = TaskManager(include_defaults=False).load([lm_task])  # indexing lm-eval's own tasks takes seconds
    if lm_task.get_config("num_fewshot") is None:
        lm_task.set_config(key="num_fewshot", value=0)
    lm_task.set_fewshot_seed(seed=OTHER_SEED)
    output = evaluate(lm=EvaluatorLM(evaluator), task_dict=loaded, log_samples=True, bootstrap_iters=0)
    assert output is not None
    logged = [e for e in output["samples"][task.lm_eval_task] if e.get("filter", "none") == filter_name]
    if len(logged) != len(documents) or (logged and metric not in logged[0]):
        known = sorted(
            {
                f"{m},{e.get('filter', 'none')}"
                for e in output["samples"][task.lm_eval_task]
                for m in e.get("metrics", [])
            }
        )
        raise TaskModelError(f"task {task.name}: lm-eval gave no metric {metric},{filter_name}; it gives {known}")
    results: list[SampleResult] = [SampleResult("", False)] * len(documents)
    for entry in logged:
        value = entry[metric]
        if value not in (0, 1):
            raise TaskModelError(
                f"task {task.name}: metric {metric} gave {value!r} for a document; an objective counts documents "
                "scored 0 or 1 (exact_match, acc, acc_norm), so choose such a metric"
            )
        filtered = entry.get("filtered_resps") or [""]
        results[entry["doc_id"]] = SampleResult(str(filtered[0]), bool(value))
    return results


@register_model("mergesearch")
class EvaluatorLM(TemplateLM):
    """lm-eval's model interface over a MergeSearch evaluator (any backend; a kept engine too)."""

    def __init__(self, evaluator: Evaluator) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.tokenizer = evaluator.prompts.tokenizer

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> EvaluatorLM:
        """For lm-eval's own entry points once this module is imported, to reproduce a trial's numbers
        with its backend: `simple_evaluate(model="mergesearch", model_args="pretrained=DIR,backend=vllm")`
        (other arguments are the backend's settings, e.g. device=cpu)."""
        from lm_eval.utils import simple_parse_args_string

        from .registry import open_evaluator

        args = simple_parse_args_string(arg_string)
        model, backend = args.pop("pretrained", None), args.pop("backend", "hf")
        if model is None:
            raise ValueError("--model_args needs pretrained=DIR, the merged model's directory")
        return cls(open_evaluator(str(backend), model=Path(str(model)), settings=args))

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # As lm-eval's hf model: the tokenizer's own special tokens, unless the text already starts with BOS.
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(string, **special))

    def _loglikelihood_tokens(self, requests: list[Any], **kwargs: Any) -> list[tuple[float, bool]]:
        scores = self.evaluator._loglikelihoods(
            [ContinuationRequest(list(context), list(continuation)) for _, context, continuation in requests]
        )
        return [(score, False) for score in scores]  # greedy flags: refused task types need them

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise TaskModelError("loglikelihood_rolling (perplexity) tasks are not objectives")

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        by_settings: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        context_len = self.evaluator.prompts.context_len
        eos = self.tokenizer.decode([self.eot_token_id])
        for indices in by_settings.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos not in until:
                until.append(eos)
            budget = int(settings.get("max_gen_toks", 256))
            if settings.get("do_sample") or float(settings.get("temperature", 0.0) or 0.0) > 0:
                raise TaskModelError("a sampled (do_sample, temperature > 0) lm-eval task; objectives are greedy")
            # As lm-eval's hf model: the context left-truncated to leave room for the budget.
            prompts = [self.tok_encode(requests[i].args[0])[-(context_len - budget) :] for i in indices]
            generated = self.evaluator._generate([GenerationRequest(p, budget) for p in prompts], stop=until)
            for index, tokens in zip(indices, generated, strict=True):
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results[index] = text
        return [r if r is not None else "" for r in results]
