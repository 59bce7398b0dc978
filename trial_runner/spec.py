"""What a trial run is asked to do, and what it reports back. Pure data (pydantic), no torch.

The controller writes a `TrialSpec` (a ConfigMap on a cluster, a file locally), the runner executes it
and reports a `TrialResult`: to stdout, to the results file and to the pod's termination message, which
Kubernetes caps at 4 KiB - so the result holds counts and timings only, never samples or logs.

Exit codes tell the controller what to do: 0 done; 65 (EX_DATAERR) the request itself is wrong - a bad
plan, a bad task file, a model that does not fit - and re-running cannot help; 75 (EX_TEMPFAIL) the
infrastructure failed - a download, the device, the memory - and a retry may succeed. Any other code
(a crash, a kill by the OOM killer) counts as infrastructure.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .plan.ir import MergePlan
from .tasks import Split, TaskSpec

EXIT_OK = 0
EXIT_USER_ERROR = 65
EXIT_INFRASTRUCTURE_ERROR = 75
TERMINATION_MESSAGE_LIMIT = 4096

ErrorKind = Literal["user", "infrastructure"]


class TrialSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the run's name, e.g. <search>-t<trial>-r<rung>")
    plan: MergePlan
    tasks: list[TaskSpec] = Field(min_length=1)
    split: Split = "search"
    ranges: dict[str, tuple[int, int]] = Field(
        default_factory=dict, description="per task, the [start, end) of the search split to evaluate"
    )
    backend: Literal["hf", "vllm"] = "hf"
    engine_args: dict[str, Any] = Field(default_factory=dict)
    device: str = Field(default="auto", description="cpu, cuda, or auto (cuda when available)")
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch's CPU threads for the merge and hf evaluation; default: the container's CPU quota, "
        "else every core",
    )
    cache_dir: str = Field(default="/var/cache/mergesearch", description="the node's shared weight cache")
    scratch_dir: str = Field(default="/tmp/mergesearch", description="where a merged model is written")
    output_uri: str | None = Field(default=None, description="upload the merged model (and plan, scores) here")
    result_file: str | None = None


class Counts(BaseModel):
    correct: int = Field(ge=0)
    evaluated: int = Field(ge=0)


class TrialResult(BaseModel):
    name: str
    ok: bool
    error_kind: ErrorKind | None = None
    message: str = ""
    tasks: dict[str, Counts] = Field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = Field(default_factory=dict)
    timings: dict[str, float] = Field(
        default_factory=dict,
        description="seconds: fetch, merge, load, evaluate, total (merge is part of load when "
        "the engine host merges in place)",
    )
    generated_tokens: int = 0

    def compact_json(self) -> str:
        """The JSON form, cut to fit a termination message (the message shrinks first)."""
        data = self.model_dump(mode="json")
        text = json.dumps(data, separators=(",", ":"))
        while len(text.encode()) > TERMINATION_MESSAGE_LIMIT and data["message"]:
            data["message"] = data["message"][: len(data["message"]) // 2] + "..."
            text = json.dumps(data, separators=(",", ":"))
        return text
