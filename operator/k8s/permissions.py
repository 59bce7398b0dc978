"""Every Kubernetes permission the operator uses, and nothing more (the chart's RBAC is checked against it).

Each rule names the calls that need it: a test reads the API module and the handlers and checks that
every call it finds is covered and every verb here is used.
"""

from __future__ import annotations

RULES: list[dict[str, list[str]]] = [
    # kopf watches the resources it handles, patches them (status, finalizers, its progress annotations).
    {"apiGroups": ["mergesearch.io"], "resources": ["mergesearches"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["mergesearch.io"], "resources": ["mergesearches/status"], "verbs": ["get", "patch"]},
    # Trial pods name their MergeSearch as owner with blockOwnerDeletion; clusters that enforce owner
    # references (OwnerReferencesPermissionEnforcement, e.g. OpenShift) require this for that.
    {"apiGroups": ["mergesearch.io"], "resources": ["mergesearches/finalizers"], "verbs": ["update"]},
    # Trial pods: created and deleted by api.py, watched (the index of runs) by kopf.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
    # The study's database URL and the S3 credentials for the preflight: api.read_secret. The token of a
    # search's worker pods (trial.reusePods): api.create_secret, once per search.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]},
    # kopf.event / kopf.warn post Events (both APIs, by Kubernetes version).
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
]
# No rule for customresourcedefinitions: the handlers turn kopf's scanning off (the resources served are
# fixed and the chart installs the CRD first), so kopf only reads API discovery, which needs no RBAC.
