"""The one module that calls the Kubernetes API directly (kopf's own watching and patching aside).

A thin layer over the official client: create and delete pods, create and read Secrets. It turns HTTP failures
into the few outcomes callers act on (already exists, gone, permanent), and is safe to call from kopf's
handler threads (the client's ApiClient is thread-safe for independent requests).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException


class KubernetesApiError(RuntimeError):
    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


def load_configuration() -> None:
    """In a pod: the service account; elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


def _discard(response: Any) -> None:
    """Read and drop a response the caller has no use for. Asked with `_preload_content=False`, the
    client skips building its model objects for the returned pod, a few ms of CPU per call; the status
    is checked (and raised as ApiException) either way."""
    response.read()
    response.release_conn()


def _created(create: Callable[..., Any], namespace: str, body: dict[str, Any], kind: str) -> bool:
    """Call a create method; False when an object of that name exists already (409)."""
    try:
        _discard(create(namespace, body, _preload_content=False))
        return True
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise KubernetesApiError(
            f"creating {kind} {body['metadata']['name']}: {exc.reason}", status=exc.status
        ) from None


class KubernetesApi:
    def __init__(self, client: kubernetes.client.ApiClient | None = None):
        self._core = kubernetes.client.CoreV1Api(client)

    def create_pod(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a pod; False when a pod of that name exists already (the call is idempotent)."""
        return _created(self._core.create_namespaced_pod, namespace, body, "pod")

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod, now (grace period 0: a trial has nothing to flush); a missing pod is fine."""
        try:
            _discard(self._core.delete_namespaced_pod(name, namespace, grace_period_seconds=0, _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:
                raise KubernetesApiError(f"deleting pod {name}: {exc.reason}", status=exc.status) from None

    def create_secret(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a Secret; False when one of that name exists already."""
        return _created(self._core.create_namespaced_secret, namespace, body, "Secret")

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        try:
            secret = self._core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise KubernetesApiError(f"Secret {namespace}/{name} does not exist", status=404) from None
            raise KubernetesApiError(f"reading Secret {namespace}/{name}: {exc.reason}", status=exc.status) from None
        return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}
