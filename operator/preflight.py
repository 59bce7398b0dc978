"""Checks that need the models and the task files, made once before a search starts.

The schema (`spec`) catches what a manifest says wrong; this catches what the world says wrong: an
expert whose shapes differ from the base, a model that cannot be read, a task file that is missing,
malformed or smaller than `maxSamples`, more layer groups than layers. It reads config.json, the
safetensors headers and the task files through the store (ranged GETs on S3; no weight is downloaded)
and needs no torch. Every error is a `ManifestError` naming the field and the fix.
"""

from __future__ import annotations

from mergesearch_trial_runner.plan.tensors import PlanError, num_layers, plan_tensors
from mergesearch_trial_runner.store import ModelStore, StoreError
from mergesearch_trial_runner.tasks import TaskDataError, parse_samples, split_samples

from .spaces import ModelFacts, build_space
from .spaces.baselines import baselines
from .spec import ManifestError, MergeSearchSpec


def _field_of_model(spec: MergeSearchSpec, name: str) -> str:
    if name == "base":
        return "spec.models.base"
    return f"spec.models.experts[{spec.expert_names.index(name)}].uri"


def model_facts(spec: MergeSearchSpec, store: ModelStore) -> ModelFacts:
    """Read every model's structure, check they can be merged, and return what the search space needs."""
    structures = {}
    for name, uri in spec.model_uris().items():
        try:
            structures[name] = store.model_structure(uri)
        except (StoreError, ValueError) as exc:
            raise ManifestError(_field_of_model(spec, name), str(exc)) from None
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
    except ValueError as exc:
        raise ManifestError("spec.searchSpace", str(exc)) from None
    return facts


def check_objectives(spec: MergeSearchSpec, store: ModelStore) -> None:
    """Every objective's data exists, parses, and holds at least `maxSamples` search samples."""
    for index, objective in enumerate(spec.objectives):
        where = f"spec.objectives[{index}]"
        task = objective.task()
        try:
            data = parse_samples(store.read_bytes(task.data).decode(), kind=task.kind, source=task.data)
            test = None
            if task.test_data is not None:
                test = parse_samples(store.read_bytes(task.test_data).decode(), kind=task.kind, source=task.test_data)
        except StoreError as exc:
            raise ManifestError(f"{where}.data", f"cannot read the task file: {exc}") from None
        except TaskDataError as exc:
            raise ManifestError(f"{where}.data", str(exc)) from None
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
