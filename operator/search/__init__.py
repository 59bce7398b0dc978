"""The search: Hyperband schedule, objectives, the Optuna study and the controller; no Kubernetes."""
