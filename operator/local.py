"""The embedded default: one manifest, one machine, no cluster.

A `MergeSearch` manifest runs here with SQLite for the study, local files or S3 for models and tasks,
and local processes for trials (`LocalExecutor`); everything the search writes goes under one work
directory, so running the same command again resumes the search.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergesearch_trial_runner.store import ModelStore

from .executors.local import LocalExecutor
from .preflight import preflight
from .search.controller import SearchController, SearchStatus
from .search.study import controller_storage, open_study
from .spaces import ModelFacts, build_space
from .spec import MergeSearch

FACTS_ATTR = "facts"


def _absolute(uri: str | None, base_dir: Path) -> str | None:
    if uri is None or "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base_dir / uri).resolve())


def resolve_paths(resource: MergeSearch, base_dir: Path) -> MergeSearch:
    """Relative paths in a manifest, read as relative to the manifest's own directory."""
    spec = resource.spec
    models = spec.models.model_copy(
        update={
            "base": _absolute(spec.models.base, base_dir),
            "experts": [e.model_copy(update={"uri": _absolute(e.uri, base_dir)}) for e in spec.models.experts],
        }
    )
    objectives = [
        o.model_copy(update={"data": _absolute(o.data, base_dir), "test_data": _absolute(o.test_data, base_dir)})
        for o in spec.objectives
    ]
    output = spec.output.model_copy(update={"uri": _absolute(spec.output.uri, base_dir)})
    spec = spec.model_copy(update={"models": models, "objectives": objectives, "output": output})
    return resource.model_copy(update={"spec": spec})


DEFAULT_CACHE = Path.home() / ".cache" / "mergesearch" / "weights"


@dataclass
class LocalSearch:
    resource: MergeSearch
    work_dir: Path
    storage_url: str
    cache_dir: Path = DEFAULT_CACHE

    @classmethod
    def for_manifest(
        cls, resource: MergeSearch, *, work_dir: Path | None = None, storage_url: str | None = None
    ) -> LocalSearch:
        work_dir = Path(work_dir or Path(".mergesearch") / resource.metadata.name).absolute()
        work_dir.mkdir(parents=True, exist_ok=True)
        return cls(resource, work_dir, storage_url or f"sqlite:///{work_dir / 'study.db'}")

    @property
    def name(self) -> str:
        return self.resource.metadata.name

    def controller(self, *, check: bool = True) -> SearchController:
        """The controller over this search's study; `check` runs the preflight (reads models and tasks)."""
        spec = self.resource.spec
        if spec.output.uri is None:
            spec = spec.model_copy(
                update={"output": spec.output.model_copy(update={"uri": str(self.work_dir / "best")})}
            )
        storage = controller_storage(self.storage_url)
        study = open_study(self.name, spec, storage)
        stored = study.user_attrs.get(FACTS_ATTR)
        if check or stored is None:
            facts = preflight(spec, ModelStore(self.cache_dir))
            study.set_user_attr(
                FACTS_ATTR,
                {"model_uris": facts.model_uris, "experts": list(facts.experts), "num_layers": facts.num_layers},
            )
        else:
            facts = ModelFacts(stored["model_uris"], tuple(stored["experts"]), stored["num_layers"])
        executor = LocalExecutor(
            self.work_dir,
            timeout_seconds=spec.trial.timeout_seconds,
            cache_dir=self.cache_dir,
            backend=spec.trial.backend,
            parallel_runs=spec.budget.parallel_trials,
        )
        return SearchController(
            name=self.name,
            spec=spec,
            study=study,
            space=build_space(spec, facts),
            facts=facts,
            executor=executor,
            storage=storage,
        )

    def run(self, on_status: Callable[[SearchStatus], None], *, poll_seconds: float = 0.5) -> SearchStatus:
        controller = self.controller()
        try:
            while True:
                status = controller.reconcile()
                on_status(status)
                if status.phase in ("Succeeded", "Failed"):
                    return status
                time.sleep(poll_seconds)
        finally:
            # Without this a process that runs one search after another (a benchmark, a test) kept every
            # search's fork server, and each kept vLLM engine host spent half a core waiting for work.
            controller.executor.close()
