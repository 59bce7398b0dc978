"""The embedded default: one manifest, one machine, no cluster.

A `MergeSearch` manifest runs here with SQLite for the study, local files or S3 for models and tasks,
and local processes for trials (`LocalExecutor`); everything the search writes goes under one work
directory, so running the same command again resumes the search.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from mergesearch_trial_runner.store import ModelStore

from .executors.local import LocalExecutor
from .search.assembly import SearchNotFound, open_search
from .search.controller import SearchController, SearchStatus
from .search.study import make_storage
from .spec import MergeSearch, MergeSearchSpec

STUDY_FILE = "study.db"


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


class SearchChanged(ValueError):
    """The work dir's search was started with other defining fields than the manifest now gives."""


@dataclass
class LocalSearch:
    resource: MergeSearch
    work_dir: Path
    storage_url: str
    cache_dir: Path = DEFAULT_CACHE
    study_name: str = ""  # default: the manifest's name; `<namespace>.<name>` for an operator's study

    @classmethod
    def for_manifest(
        cls,
        resource: MergeSearch,
        *,
        work_dir: Path | None = None,
        storage_url: str | None = None,
        namespace: str | None = None,
    ) -> LocalSearch:
        work_dir = Path(work_dir or Path(".mergesearch") / resource.metadata.name).absolute()
        name = resource.metadata.name
        return cls(
            resource,
            work_dir,
            storage_url or f"sqlite:///{work_dir / STUDY_FILE}",
            study_name=f"{namespace}.{name}" if namespace else name,
        )

    @property
    def name(self) -> str:
        return self.resource.metadata.name

    def _spec(self) -> MergeSearchSpec:
        spec = self.resource.spec
        if spec.output.uri is not None:
            return spec
        return spec.model_copy(update={"output": spec.output.model_copy(update={"uri": str(self.work_dir / "best")})})

    def controller(self) -> SearchController:
        """The controller that runs this search: creates its study or resumes it, after the preflight
        (reads models and tasks). Refuses to resume a search whose defining fields the manifest changed."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        opened = open_search(self.name, self.study_name, self._spec(), self.storage_url, create=True)
        if opened.refused:
            raise SearchChanged(
                f"{self.work_dir} holds a search started with other values of {', '.join(opened.refused)}; "
                "resuming would mix two searches in one study. Start over with `mergesearch run MANIFEST "
                "--restart` (deletes that search's trials and runs), or give another --work-dir"
            )
        facts = opened.facts(ModelStore(self.cache_dir), recheck=True)  # the files may have changed since
        return opened.controller(facts, self._executor(opened.spec))

    def inspect(self) -> SearchController:
        """A controller over the stored search for reading its status, best plans and report: it opens no
        new study and writes nothing (for `status`, `best`, `report`; an operator's study too)."""
        if self._never_run():
            raise SearchNotFound(f"no search has run in {self.work_dir}; start it with `mergesearch run`")
        opened = open_search(self.name, self.study_name, self._spec(), self.storage_url, create=False)
        return opened.controller(opened.facts(), self._executor(opened.spec))

    def _never_run(self) -> bool:
        """No SQLite study file yet (opening one would create it, and fails where its directory is missing)."""
        return (
            self.storage_url.startswith("sqlite:///") and not Path(self.storage_url.removeprefix("sqlite:///")).exists()
        )

    def _executor(self, spec: MergeSearchSpec) -> LocalExecutor:
        return LocalExecutor(
            self.work_dir,
            timeout_seconds=spec.trial.timeout_seconds,
            cache_dir=self.cache_dir,
            backend=spec.trial.backend,
            parallel_runs=spec.budget.parallel_trials,
        )

    def discard(self) -> None:
        """Delete this search's study and what its runs left in the work dir (the weight cache stays)."""
        if self._never_run():
            return
        with contextlib.suppress(KeyError):  # KeyError: never started
            optuna.delete_study(study_name=self.study_name, storage=make_storage(self.storage_url))
        for leftover in ("runs", "best", "runs.log", "engine-host.log", "report.html"):
            path = self.work_dir / leftover
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def run(self, on_status: Callable[[SearchStatus], None], *, poll_seconds: float = 0.5) -> SearchStatus:
        controller = self.controller()
        try:
            while True:
                status = controller.reconcile()
                on_status(status)
                if status.phase.finished:
                    return status
                time.sleep(poll_seconds)
        finally:
            # Without this a process that runs one search after another (a benchmark, a test) kept every
            # search's fork server, and each kept engine host spent half a core waiting for work.
            controller.executor.close()
