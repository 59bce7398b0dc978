"""One search's live parts on a cluster: its study, space, executor, controller and metrics.

Built from the resource the first time the operator sees it (or after a restart), kept in memory while
the resource exists; everything it needs to continue is in the study (PostgreSQL) and in the pods.
The fields that define a search (`search.study.DEFINING`) are fixed when its study is created: a later
edit of them is refused (the search goes on with the accepted ones and a condition says so), while
budgets, `suspend`, the other trial settings and the output may change.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3

from mergesearch_trial_runner.store import ModelStore

from ..metrics import SearchMetrics
from ..search.assembly import open_search
from ..search.controller import SearchController
from ..search.study import ACCEPTED_ATTR, effective_spec
from ..spec import MergeSearchSpec, parse_manifest
from .api import KubernetesApi, KubernetesApiError
from .executor import KubernetesExecutor, PodExecutor
from .pods import TOKEN_KEY, owner_reference
from .settings import OperatorSettings
from .workers import WorkerPodExecutor

REPORT_FILE = "report.html"


def parse_spec(name: str, namespace: str, spec: dict[str, Any]) -> MergeSearchSpec:
    document = {
        "apiVersion": "mergesearch.io/v1alpha1",
        "kind": "MergeSearch",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return parse_manifest(document).spec


def s3_client(api: KubernetesApi, namespace: str, secret: str) -> Any:
    """A boto3 client with the credentials of the search's S3 Secret (the operator's own preflight reads)."""
    values = api.read_secret(namespace, secret)
    return boto3.client(
        "s3",
        aws_access_key_id=values.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=values.get("AWS_SECRET_ACCESS_KEY"),
        endpoint_url=values.get("AWS_ENDPOINT_URL") or None,
        region_name=values.get("AWS_REGION") or None,
    )


def worker_token(api: KubernetesApi, namespace: str, secret: str, search: str, uid: str) -> str:
    """The token the search's worker pods want on every request: made once, kept in a Secret that the
    search owns (so a restarted operator reads the same one, and it goes with the search)."""
    api.create_secret(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret, "namespace": namespace, "ownerReferences": [owner_reference(search, uid)]},
            "stringData": {TOKEN_KEY: secrets.token_urlsafe(32)},
        },
    )
    token = api.read_secret(namespace, secret).get(TOKEN_KEY)
    if not token:
        raise KubernetesApiError(f"Secret {namespace}/{secret} has no key `{TOKEN_KEY}`; delete it to get a new one")
    return token


@dataclass
class SearchRuntime:
    name: str
    namespace: str
    controller: SearchController
    executor: PodExecutor
    metrics: SearchMetrics
    refused: list[str] = field(default_factory=list)  # defining fields whose edit was refused
    fingerprint: object = None  # what the last reconcile saw (handlers skip a reconcile that would see the same)
    reconciled_at: float = 0.0
    failures: int = 0  # reconciles failed in a row (the database away, say)
    retry_at: float = 0.0  # when to try again after a failure
    output_store: Callable[[], ModelStore] | None = None  # where the report goes (the search's S3 credentials)

    @classmethod
    def build(
        cls,
        *,
        name: str,
        namespace: str,
        uid: str,
        spec: MergeSearchSpec,
        api: KubernetesApi,
        settings: OperatorSettings,
    ) -> SearchRuntime:
        """Open (or create) the study and check the models and tasks; raises ManifestError for the user's
        mistakes and KubernetesApiError/StoreError for what may come right later."""
        database_secret = spec.storage.database_secret_ref.name if spec.storage.database_secret_ref else None
        s3_secret = spec.storage.s3_secret_ref.name if spec.storage.s3_secret_ref else settings.s3_secret
        secret = database_secret or settings.database_secret
        url = api.read_secret(namespace, secret).get("url")
        if not url:
            raise KubernetesApiError(f"Secret {namespace}/{secret} has no key `url` (the study's SQLAlchemy URL)")
        opened = open_search(name, f"{namespace}.{name}", spec, url, create=True)
        spec = opened.spec
        store = None if opened.has_facts else ModelStore(client=s3_client(api, namespace, s3_secret))
        facts = opened.facts(store)
        pods = {
            "api": api,
            "search": name,
            "namespace": namespace,
            "owner_uid": uid,
            "trial": spec.trial,
            "s3_secret": s3_secret,
            "settings": settings,
        }
        executor: PodExecutor
        if spec.trial.reuse_pods:
            token_secret = f"{name}-worker-token"
            token = worker_token(api, namespace, token_secret, name, uid)
            executor = WorkerPodExecutor(token_secret=token_secret, token=token, **pods)
        else:
            executor = KubernetesExecutor(**pods)
        metrics = SearchMetrics(namespace, name)
        controller = opened.controller(facts, executor, observer=metrics)
        output_store = lambda: ModelStore(client=s3_client(api, namespace, s3_secret))  # noqa: E731
        return cls(name, namespace, controller, executor, metrics, opened.refused, output_store=output_store)

    def publish_report(self) -> str | None:
        """Write the search's HTML report beside its best merge (`output.uri`/report.html, as `mergesearch
        run` writes it to its work dir); its URI, or None for a search without an output."""
        from ..report import render  # matplotlib, only when a search finishes

        output = self.controller.spec.output.uri
        if output is None or self.output_store is None:
            return None
        uri = f"{output.rstrip('/')}/{REPORT_FILE}"
        self.output_store().write_bytes(uri, render(self.controller, self.name).encode())
        return uri

    def update_spec(self, spec: MergeSearchSpec) -> None:
        """Apply an edited spec: the changeable fields take effect; defining ones are refused."""
        accepted = self.controller.study.user_attrs[ACCEPTED_ATTR]
        spec, self.refused = effective_spec(spec, accepted)
        self.controller.spec = spec
        self.executor.trial = spec.trial
