"""The Optuna study behind a search: storage, sampler, directions.

One study per MergeSearch, in PostgreSQL on a cluster and SQLite on one machine. It is the source of
truth: trial parameters (hence plans), per-rung counts, decisions and failures are trial attributes, so
a controller that starts over with the same storage resumes where the last one stopped.
"""

from __future__ import annotations

import optuna
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
