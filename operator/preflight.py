"""Checks that need the models and the task files, made once before a search starts.

The schema (`spec`) catches what a manifest says wrong; this catches what the world says wrong: an
expert whose shapes differ from the base, a model that cannot be read or whose config.json needs the
checkpoint's own code (trust_remote_code, which trials never run), a task file that is missing,
malformed or smaller than `maxSamples`, more layer groups than layers. It reads config.json, the
safetensors headers and the task files through the store (ranged GETs on S3; no weight is downloaded)
and needs no torch. Every error is a `ManifestError` naming the field and the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from mergesearch_trial_runner.plan.tensors import PlanError, num_layers, plan_tensors
from mergesearch_trial_runner.store import ModelStore, StoreError
from mergesearch_trial_runner.tasks import Sample, TaskDataError, TaskSpec, parse_samples, split_samples

from .spaces import ModelFacts, build_space
from .spaces.base import SpaceError
from .spaces.baselines import baselines
from .spec import ManifestError, MergeSearchSpec


def _field_of_model(spec: MergeSearchSpec, name: str) -> str:
    if name == "base":
        return "spec.models.base"
    return f"spec.models.experts[{spec.expert_names.index(name)}].uri"


@functools.cache
def known_model_types() -> frozenset[str] | None:
    """The `model_type`s the installed transformers knows; None where it is not installed.

    The operator's image has no transformers (its trials run in another image), so there only `auto_map`
    is checked. `mergesearch run`, whose trials run in this environment, has it. The names come from
    `auto_mappings`, a plain dict that imports no torch (`configuration_auto.CONFIG_MAPPING_NAMES`, the
    full registry, imports torch); it lacks the few types `configuration_auto` adds by hand (vision,
    audio and protein models, and the old alias gpt-sw3), none of them a language model to merge here.
    """
    try:
        from transformers.models.auto.auto_mappings import CONFIG_MAPPING_NAMES
    except ImportError:
        try:  # a transformers from before auto_mappings: the registry itself (imports torch)
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        except ImportError:
            return None
    return frozenset(CONFIG_MAPPING_NAMES)


def needs_remote_code(config: Mapping[str, Any]) -> str | None:
    """Why loading a model of this config.json would need the checkpoint's own Python code (which trials
    never run: no trust_remote_code), or None."""
    fix = (
        "trials never run a checkpoint's own code (trust_remote_code); use a model of an architecture that "
        "ships with transformers"
    )
    if "auto_map" in config:
        return f"config.json has the key `auto_map`: the model's classes are Python files in the checkpoint; {fix}"
    known = known_model_types()
    model_type = config.get("model_type")
    if known is not None and isinstance(model_type, str) and model_type not in known:
        return (
            f"config.json's key `model_type` is {model_type!r}, which transformers {metadata.version('transformers')} "
            f"does not know, so only the checkpoint's own code could load it; {fix}"
        )
    return None


def model_facts(spec: MergeSearchSpec, store: ModelStore) -> ModelFacts:
    """Read every model's structure, check they can be merged, and return what the search space needs."""
    structures = {}
    for name, uri in spec.model_uris().items():
        try:
            structures[name] = store.model_structure(uri)
        except (StoreError, ValueError) as exc:
            raise ManifestError(_field_of_model(spec, name), str(exc)) from None
        if (problem := needs_remote_code(structures[name].config)) is not None:
            raise ManifestError(_field_of_model(spec, name), problem)
    facts = ModelFacts(
        model_uris=spec.model_uris(), experts=tuple(spec.expert_names), num_layers=num_layers(structures["base"].config)
    )
    # Lowering the baselines touches every tensor of every model: shapes, vocabularies, architectures.
    for plan in baselines(facts).values():
        try:
            plan_tensors(plan, structures)
        except PlanError as exc:
            name = exc.field.removeprefix("models.")
            field = _field_of_model(spec, name) if name in structures else "spec.models"
            raise ManifestError(field, str(exc).split(": ", 1)[-1]) from None
    try:
        build_space(spec, facts)
    except SpaceError as exc:
        raise ManifestError(f"spec.searchSpace.{exc.field}", str(exc)) from None
    return facts


def _samples(store: ModelStore, task: TaskSpec, field: str, uri: str) -> list[Sample]:
    """The samples of one task file; a `ManifestError` naming `field` (data or testData) when it cannot be
    read or parsed."""
    try:
        return parse_samples(store.read_text(uri), kind=task.kind, source=uri)
    except StoreError as exc:
        raise ManifestError(field, f"cannot read the task file: {exc}") from None
    except TaskDataError as exc:
        raise ManifestError(field, str(exc)) from None


def check_lm_eval_task(task: TaskSpec, store: ModelStore, where: str) -> None:
    """An lm_eval objective's few-shot documents and task config can be read, and its task is one lm-eval
    knows: checked where lm-eval is installed (`mergesearch run`; the operator's image has none, and its
    trials report an unknown task as a user error)."""
    if task.few_shot_data is not None:
        _samples(store, task, f"{where}.fewShotData", task.few_shot_data)
    if task.task_config is not None:
        try:
            store.read_text(task.task_config)
        except StoreError as exc:
            raise ManifestError(f"{where}.taskConfig", f"cannot read the task config: {exc}") from None
    try:
        from mergesearch_trial_runner.evaluate.lm_eval_tasks import task_config
    except ImportError:
        return
    try:
        task_config(task, store.read_text)
    except (ValueError, StoreError) as exc:
        field = "taskConfig" if task.task_config is not None else "lmEvalTask"
        raise ManifestError(f"{where}.{field}", str(exc)) from None


def check_objectives(spec: MergeSearchSpec, store: ModelStore) -> None:
    """Every objective's data exists, parses, and holds at least `maxSamples` search samples."""
    for index, objective in enumerate(spec.objectives):
        where = f"spec.objectives[{index}]"
        task = objective.task()
        if task.kind == "lm_eval":
            check_lm_eval_task(task, store, where)
        data = _samples(store, task, f"{where}.data", task.data)
        test = None if task.test_data is None else _samples(store, task, f"{where}.testData", task.test_data)
        splits = split_samples(task, data, test)
        if len(splits["search"]) < spec.fidelity.max_samples:
            raise ManifestError(
                f"{where}.data",
                f"objective {task.name!r} has {len(splits['search'])} search samples but fidelity.maxSamples is "
                f"{spec.fidelity.max_samples}; lower maxSamples or add samples",
            )


def preflight(spec: MergeSearchSpec, store: ModelStore) -> ModelFacts:
    facts = model_facts(spec, store)
    check_objectives(spec, store)
    return facts
