"""The Kubernetes edge: the CRD, trial pods, the executor that runs them, and the kopf handlers."""
