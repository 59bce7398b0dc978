"""Install-and-observe checks: the Helm chart, the kustomize manifests, the examples, the images, the dashboard.

Everything here runs offline: Helm (helm-python-sdk) renders the chart, `kubectl kustomize` builds the
overlays, kubernetes-validate checks every object against the Kubernetes API schemas, and a real
Prometheus scrapes metrics for the dashboard's queries. `install.dashboard.dashboard_queries()` is the
entry point for end-to-end tests that run the dashboard against the operator's own metrics.
"""
