"""One way to put a search together, on one machine or a cluster: open its study, take the spec in
effect, read the model facts, build the space and the controller.

`mergesearch run`, its read-only inspection (`status`, `best`, `report`) and the operator's
`SearchRuntime` differ only in what they do around it: whether the study may be created, whether a
changed defining field is refused or set aside, when the preflight runs, and which executor runs trials.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from mergesearch_trial_runner.store import ModelStore

from ..executors.base import Executor
from ..preflight import preflight
from ..spaces import ModelFacts, build_space
from ..spec import MergeSearchSpec
from .controller import SearchController, SearchObserver
from .storage import SingleWriterStorage
from .study import ACCEPTED_ATTR, FACTS_ATTR, accepted_spec, controller_storage, effective_spec, open_study


class SearchNotFound(ValueError):
    """Inspection found no search to show (it never creates one)."""


@dataclass
class OpenedSearch:
    name: str  # the search's name (its runs are named after it)
    study: optuna.Study
    storage: SingleWriterStorage
    spec: MergeSearchSpec  # the defining fields as the study first accepted them, the rest as given
    refused: list[str]  # defining fields the given spec changed (named as a user writes them)

    @property
    def has_facts(self) -> bool:
        return FACTS_ATTR in self.study.user_attrs

    def facts(self, store: ModelStore | None = None, *, recheck: bool = False) -> ModelFacts:
        """The model facts the first preflight stored; the preflight runs (and stores them) when there are
        none yet, or on `recheck`. Without a store, stored facts are all there is."""
        stored = self.study.user_attrs.get(FACTS_ATTR)
        if store is None or (stored is not None and not recheck):
            if stored is None:
                raise SearchNotFound(f"the search {self.study.study_name!r} has not passed its preflight yet")
            return ModelFacts.from_json(stored)
        facts = preflight(self.spec, store)
        self.study.set_user_attr(FACTS_ATTR, facts.to_json())
        return facts

    def controller(
        self, facts: ModelFacts, executor: Executor, observer: SearchObserver | None = None
    ) -> SearchController:
        return SearchController(
            name=self.name,
            spec=self.spec,
            study=self.study,
            space=build_space(self.spec, facts),
            facts=facts,
            executor=executor,
            storage=self.storage,
            observer=observer,
        )


def open_search(name: str, study_name: str, spec: MergeSearchSpec, storage_url: str, *, create: bool) -> OpenedSearch:
    """Open the search's study (creating it when `create`, else `SearchNotFound`) with the spec in effect."""
    storage = controller_storage(storage_url)
    if create:
        study = open_study(study_name, spec, storage)
        accepted = accepted_spec(study, spec)
    else:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            names = [s.study_name for s in storage.get_all_studies()]
            hint = "" if "." in study_name else "; an operator's study is NAMESPACE.NAME: give --namespace"
            raise SearchNotFound(f"no study named {study_name!r} in {storage_url} (it holds {names}){hint}") from None
        accepted = study.user_attrs.get(ACCEPTED_ATTR) or {}
    effective, refused = effective_spec(spec, accepted)
    return OpenedSearch(name, study, storage, effective, refused)
