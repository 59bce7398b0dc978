"""What the pod executors' tests drive them with instead of a cluster: an API that records what it is
asked to do, and a small trial spec."""

from __future__ import annotations

from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.spec import TrialSpec


def spec(name: str = "s-t3-r1") -> TrialSpec:
    plan = MergePlan.model_validate(
        {
            "models": {"base": "s3://m/base", "a": "s3://m/a"},
            "base_model": "base",
            "slices": [{"method": "linear", "sources": [{"model": "a", "layers": [0, 2], "params": {"weight": 1.0}}]}],
        }
    )
    return TrialSpec(name=name, plan=plan, tasks=[{"name": "t", "data": "s3://e/t.jsonl"}], ranges={"t": (0, 10)})


class RecordingApi:
    def __init__(self):
        self.created, self.deleted = [], []

    def create_pod(self, namespace, body):
        self.created.append(body["metadata"]["name"])
        return True

    def delete_pod(self, namespace, name):
        self.deleted.append(name)
