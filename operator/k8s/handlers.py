"""The kopf handlers: thin translations of resource events into controller calls and status patches.

- `trial_pods`: an index of every trial pod by (namespace, search), fed by kopf's watch; the executor
  reads it instead of listing pods.
- `reconcile`: a timer per MergeSearch, level-based: build the search's runtime if needed, take the
  pod index, run one `SearchController.reconcile()`, patch the status when it changed, post an Event
  when the phase changes.
- `spec_changed`: applies an edited spec (budgets, suspend, trial settings) and refuses edits of the
  fields that define a search with a condition and a Warning Event.
- `cleanup`: on deletion (kopf's finalizer), deletes the search's pods; the study stays in the database
  unless the resource is annotated `mergesearch.io/delete-study: "true"`.

A bad resource never crashes the operator or blocks others: its errors become a `Ready=False` condition
and one Warning Event per distinct message.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
import optuna

from ..metrics import SearchMetrics, serve
from ..search.phases import Phase
from ..search.storage import StorageDiverged
from ..spec import API_GROUP, API_VERSION, ManifestError
from . import status as st
from .api import KubernetesApi, load_configuration
from .crd import PLURAL
from .executor import PodView
from .pods import LABEL_SEARCH
from .runtime import SearchRuntime, parse_spec
from .settings import OperatorSettings

RESOURCE = (API_GROUP, API_VERSION, PLURAL)
DELETE_STUDY_ANNOTATION = f"{API_GROUP}/delete-study"
TICK_SECONDS = 1.0  # how often the timer looks at a search; what it then does is gated below
FULL_RECONCILE_SECONDS = 30.0  # a search whose pods have not changed is still reconciled this often
SETTINGS = OperatorSettings()
log = logging.getLogger(__name__)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{API_GROUP}/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.posting.level = logging.INFO
    settings.scanning.disabled = True  # the served resources are fixed; the chart installs the CRD first
    settings.execution.max_workers = 8  # reconciles of different searches in parallel threads
    load_configuration()
    memo.api = KubernetesApi()
    memo.runtimes = {}
    memo.failures = {}  # (namespace, name) -> (last message, when)
    if memo.get("metrics_port"):
        serve(memo.metrics_port)


@kopf.index("pods", labels={LABEL_SEARCH: kopf.PRESENT})
async def trial_pods(
    namespace: str, labels: dict[str, str], body: kopf.Body, **_: Any
) -> dict[tuple[str, str], PodView]:
    # async: it only reads the event, and kopf runs a sync handler through a thread pool, per pod event
    return {(namespace, labels[LABEL_SEARCH]): PodView.from_body(body)}


def retry_delay(failures: int) -> float:
    """Seconds before trying again after `failures` failures in a row (a database or a Secret that is not
    there): 0.5 s, doubling, at most one reconcile interval. A database that comes back is used again
    within seconds, and one that stays down sees one attempt per interval from each search, not a storm."""
    return min(SETTINGS.reconcile_seconds, 0.5 * 2 ** max(0, failures - 1))


def _fail(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, reason: str, field_message: str) -> None:
    """Record a problem as a condition, and as a Warning Event when the message is new."""
    key = (body.metadata.namespace, body.metadata.name)
    conditions = list(body.get("status", {}).get("conditions", []))
    new = st.condition(st.READY, False, reason, field_message, conditions)
    patch.status["conditions"] = st.with_condition(conditions, new)
    patch.status["phase"] = Phase.INVALID if reason == st.REASON_INVALID else Phase.PENDING
    patch.status["message"] = field_message
    last_message, _, failures = memo.failures.get(key, ("", 0.0, 0))
    if last_message != field_message:
        kopf.warn(body, reason=reason, message=field_message)
    failures = failures + 1 if last_message == field_message else 1
    memo.failures[key] = (field_message, time.monotonic() + retry_delay(failures), failures)
    SearchMetrics(*key).phase(patch.status["phase"])


def _runtime(body: kopf.Body, spec: dict[str, Any], patch: kopf.Patch, memo: kopf.Memo) -> SearchRuntime | None:
    key = (body.metadata.namespace, body.metadata.name)
    runtime = memo.runtimes.get(key)
    if runtime is not None:
        return runtime
    message, retry_at, _ = memo.failures.get(key, ("", 0.0, 0))
    if message and time.monotonic() < retry_at:
        return None
    try:
        parsed = parse_spec(key[1], key[0], dict(spec))
        runtime = SearchRuntime.build(
            name=key[1], namespace=key[0], uid=body.metadata.uid, spec=parsed, api=memo.api, settings=SETTINGS
        )
    except ManifestError as exc:
        _fail(body, patch, memo, st.REASON_INVALID, str(exc))
        return None
    except Exception as exc:  # a Secret, database or bucket not there (yet): say so, try again soon
        message = f"{type(exc).__name__}: {exc}"
        if memo.failures.get(key, ("",))[0] != message:
            log.exception("setting up %s/%s failed", *key)
        _fail(body, patch, memo, st.REASON_UNAVAILABLE, message)
        return None
    memo.failures.pop(key, None)
    memo.runtimes[key] = runtime
    return runtime


@kopf.timer(*RESOURCE, interval=TICK_SECONDS, backoff=TICK_SECONDS, initial_delay=0.5)
def reconcile(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    patch: kopf.Patch,
    trial_pods: kopf.Index,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    runtime = _runtime(body, spec, patch, memo)
    if runtime is None:
        return
    started, now = time.perf_counter(), time.monotonic()
    pods = {pod.name: pod for pod in trial_pods.get((runtime.namespace, runtime.name), [])}
    fingerprint = (meta.get("generation"), frozenset(pods.values()))
    if runtime.failures:  # the last reconcile failed (the database is away, say): try again on its back-off
        if now < runtime.retry_at:
            return
    else:
        # A reconcile every interval, but nothing a reconcile acts on has changed (no pod moved, no spec
        # edit): skip the study's reads, though not for long, since some rules are about time
        # (unschedulable pods, deadlines). Runs in worker pods finish without any pod moving, so their
        # searches are reconciled every interval.
        since = now - runtime.reconciled_at
        unchanged = fingerprint == runtime.fingerprint and runtime.executor.pods_show_progress
        if since < SETTINGS.reconcile_seconds or (unchanged and since < FULL_RECONCILE_SECONDS):
            return
    runtime.executor.observe(pods)
    try:
        current = runtime.controller.reconcile()
    except Exception as exc:  # kept from kopf, whose timers would wait a minute before the next try
        runtime.metrics.reconciled(time.perf_counter() - started, error=True)
        if isinstance(exc, StorageDiverged):  # the next reconcile builds a new runtime from the database
            memo.runtimes.pop((runtime.namespace, runtime.name), None)
        runtime.failures += 1
        runtime.retry_at = time.monotonic() + retry_delay(runtime.failures)
        where = f"{runtime.namespace}/{runtime.name}"
        if runtime.failures == 1:
            log.exception("reconciling %s failed; trying again", where)
        else:
            log.warning("reconciling %s failed again (%d in a row): %r", where, runtime.failures, exc)
        return
    if runtime.failures:
        log.info("reconciling %s/%s works again after %d failures", runtime.namespace, runtime.name, runtime.failures)
    runtime.failures = 0
    runtime.metrics.reconciled(time.perf_counter() - started, error=False)
    runtime.fingerprint, runtime.reconciled_at = fingerprint, time.monotonic()
    runtime.metrics.update(current)
    conditions = list(status.get("conditions", []))
    if runtime.refused:
        message = f"these fields cannot change once a search has started and keep their first value: {runtime.refused}"
        conditions = st.with_condition(
            conditions, st.condition(st.SPEC_ACCEPTED, False, st.REASON_IMMUTABLE, message, conditions)
        )
    else:
        conditions = st.with_condition(
            conditions, st.condition(st.SPEC_ACCEPTED, True, st.REASON_ACCEPTED, "the spec is in effect", conditions)
        )
    new = st.search_status(current, generation=meta.get("generation"), conditions=conditions)
    if {k: status.get(k) for k in new} != new:
        patch.status.update(new)
    if status.get("phase") != current.phase:
        kopf.event(
            body,
            type="Warning" if current.phase is Phase.FAILED else "Normal",
            reason=current.phase,
            message=current.message or current.phase,
        )
        if current.phase is Phase.SUCCEEDED:
            _publish_report(body, runtime)


def _publish_report(body: kopf.Body, runtime: SearchRuntime) -> None:
    """The report beside the best merge; a failure to write it is said, and the search stays Succeeded."""
    try:
        uri = runtime.publish_report()
    except Exception as exc:
        log.exception("writing the report of %s/%s failed", runtime.namespace, runtime.name)
        kopf.warn(body, reason="ReportFailed", message=f"the report was not written: {type(exc).__name__}: {exc}")
        return
    if uri is not None:
        kopf.info(body, reason="Report", message=f"the search's report is at {uri}")


@kopf.on.update(*RESOURCE, field="spec")
def spec_changed(body: kopf.Body, spec: kopf.Spec, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    key = (body.metadata.namespace, body.metadata.name)
    memo.failures.pop(key, None)  # a fixed spec is tried at once
    runtime = memo.runtimes.get(key)
    if runtime is None:
        return
    try:
        parsed = parse_spec(key[1], key[0], dict(spec))
    except ManifestError as exc:
        _fail(body, patch, memo, st.REASON_INVALID, str(exc))
        return
    runtime.update_spec(parsed)
    if runtime.refused:
        kopf.warn(
            body,
            reason=st.REASON_IMMUTABLE,
            message=f"refused: {runtime.refused} cannot change once the search has started",
        )


@kopf.on.delete(*RESOURCE)
def cleanup(body: kopf.Body, meta: kopf.Meta, trial_pods: kopf.Index, memo: kopf.Memo, **_: Any) -> None:
    key = (body.metadata.namespace, body.metadata.name)
    for pod in trial_pods.get(key, []):
        memo.api.delete_pod(key[0], pod.name)
    runtime = memo.runtimes.pop(key, None)
    memo.failures.pop(key, None)
    if runtime is not None:
        runtime.metrics.forget()
        if meta.get("annotations", {}).get(DELETE_STUDY_ANNOTATION) == "true":
            records = runtime.controller.records
            optuna.delete_study(study_name=records.study.study_name, storage=records.storage)
