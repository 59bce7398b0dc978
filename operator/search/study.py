"""The Optuna study behind a search: storage, sampler, directions.

One study per MergeSearch, in PostgreSQL on a cluster and SQLite on one machine. It is the source of
truth: trial parameters (hence plans), per-rung counts, decisions and failures are trial attributes, so
a controller that starts over with the same storage resumes where the last one stopped.

The study also keeps the fields that define its search (`DEFINING`: models, space, objectives, fidelity,
the sampler and its seed, the objective mode, multi-fidelity, whether pods are reused), as first given.
Trials of another space or other objectives cannot be mixed into it: on a cluster an edit of them is
refused (the search goes on with the accepted values and a condition says so); `mergesearch run` refuses
to resume with them changed. Budgets, `suspend`, the other trial settings and the output may change.
"""

from __future__ import annotations

from typing import Any

import optuna
from pydantic.alias_generators import to_camel
from sqlalchemy.pool import NullPool

from ..spec import MergeSearchSpec
from .storage import SingleWriterStorage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage for `url` (sqlite:///path or postgresql://...)."""
    engine_kwargs: dict = {}
    if url.startswith("sqlite"):
        # SQLite allows one writer; NullPool avoids holding connections across processes.
        engine_kwargs = {"poolclass": NullPool, "connect_args": {"timeout": 60}}
    else:
        # No pre-ping: it costs a round trip per storage call (Optuna opens a session per call); recycling
        # connections before the server's idle timeout does the same job for a long-running operator.
        engine_kwargs = {"pool_recycle": 600}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=None)


def controller_storage(url: str) -> SingleWriterStorage:
    """The storage a search's controller, its only writer, uses: reads from memory, writes through."""
    return SingleWriterStorage(make_storage(url))


def make_sampler(spec: MergeSearchSpec) -> optuna.samplers.BaseSampler:
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.search.seed)
    return optuna.samplers.TPESampler(
        seed=spec.search.seed,
        multivariate=True,
        group=True,  # the spaces are conditional (define-by-run): model each branch on its own
        constant_liar=True,  # several trials run at once; do not propose the same point twice
        n_startup_trials=10,
    )


def open_study(name: str, spec: MergeSearchSpec, storage: optuna.storages.BaseStorage | str) -> optuna.Study:
    """Create the search's study, or load it when it exists (a restart or a continued search)."""
    if isinstance(storage, str):
        storage = make_storage(storage)
    objectives = len(spec.objectives) if spec.search.objective_mode == "pareto" else 1
    return optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(spec),
        directions=["maximize"] * objectives,
        load_if_exists=True,
    )


ACCEPTED_ATTR = "accepted_spec"
FACTS_ATTR = "facts"  # ModelFacts.to_json(), stored by the first preflight
# spec section -> the fields of it that define a search (None: the whole section).
DEFINING: dict[str, tuple[str, ...] | None] = {
    "models": None,
    "search_space": None,
    "objectives": None,
    "fidelity": None,
    "storage": None,
    # The sampler and its seed are built with the study, and the seed also draws brackets and DARE masks.
    "search": ("sampler", "seed", "objective_mode", "multi_fidelity"),
    "trial": ("reuse_pods",),  # which executor runs the trials
}


def defining(spec: MergeSearchSpec) -> dict[str, Any]:
    """The part of a spec that cannot change once its study exists."""
    data = spec.model_dump(mode="json", include={k for k, fields in DEFINING.items() if fields is None})
    for section, fields in DEFINING.items():
        if fields is not None:
            data[section] = getattr(spec, section).model_dump(mode="json", include=set(fields))
    return data


def changed_fields(spec: MergeSearchSpec, accepted: dict[str, Any]) -> list[str]:
    """The defining fields whose value differs from the accepted one, named as a user writes them.

    Only fields the accepted record holds count: a study made by an earlier version lacks some."""
    current = defining(spec)
    changed: list[str] = []
    for key, value in accepted.items():
        if DEFINING.get(key) is None:
            changed += [to_camel(key)] if current.get(key) != value else []
        else:
            changed += [f"{to_camel(key)}.{to_camel(part)}" for part in value if current[key].get(part) != value[part]]
    return sorted(changed)


def effective_spec(spec: MergeSearchSpec, accepted: dict[str, Any]) -> tuple[MergeSearchSpec, list[str]]:
    """The spec to run: the accepted defining fields, the rest as given; and which fields were refused."""
    changed = changed_fields(spec, accepted)
    if not changed:
        return spec, []
    merged = spec.model_dump(mode="json", by_alias=False)
    for key, value in accepted.items():
        merged[key] = value if DEFINING.get(key) is None else {**merged[key], **value}
    return MergeSearchSpec.model_validate(merged), changed


def accepted_spec(study: optuna.Study, spec: MergeSearchSpec) -> dict[str, Any]:
    """The defining fields the study was started with; stored from `spec` when it has none yet."""
    accepted = study.user_attrs.get(ACCEPTED_ATTR)
    if accepted is None:
        accepted = defining(spec)
        study.set_user_attr(ACCEPTED_ATTR, accepted)
    return accepted
