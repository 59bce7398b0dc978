"""The MergeSearch resource: one schema for the manifest parser, the CRD and the documentation.

Field names are camelCase in YAML (Kubernetes' convention) and snake_case in Python. Everything a schema
can say (types, enums, bounds, defaults) is said here so that the generated CRD's OpenAPI validation says
it too; cross-field rules (min below max, methods that need experts) are model validators whose
messages name the field and the fix. Checks that need the models themselves (an expert whose shapes
differ from the base) are in `preflight`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasGenerator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from mergesearch_trial_runner.tasks import TaskSpec

API_GROUP = "mergesearch.io"
API_VERSION = "v1alpha1"
KIND = "MergeSearch"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SEARCHABLE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        populate_by_name=True,
    )


class Expert(_Spec):
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=40, description="short name used in plans and reports")]
    uri: str = Field(description="model directory: a path, file:// or s3:// URI (safetensors weights)")


class Models(_Spec):
    base: str = Field(description="the model the experts were fine-tuned from: path, file:// or s3:// URI")
    experts: list[Expert] = Field(min_length=1, description="the fine-tuned models to merge")

    @model_validator(mode="after")
    def _unique(self) -> Models:
        names = [e.name for e in self.experts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"expert names must be unique; {duplicates} appear twice")
        if "base" in names:
            raise ValueError("an expert is named `base`, which names the base model; rename the expert")
        return self


class LFSSpace(_Spec):
    """Layer-wise fusion: per group of consecutive layers, a merge method and its parameters."""

    type: Literal["LFS"] = Field(description="LFS (layer-wise fusion) or DIS (depth-wise integration)")
    layer_groups: int | None = Field(default=None, ge=1, description="number of contiguous layer groups")
    layers_per_group: int | None = Field(default=None, ge=1, description="alternative to layerGroups")
    methods: list[Literal[SEARCHABLE_METHODS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"],
        min_length=1,
        description="merge methods a group may use",
    )
    tensor_groups: list[str] = Field(
        default_factory=lambda: ["self_attn", "mlp"],
        description="name filters whose tensors get their own parameters (the rest share one set)",
    )

    @model_validator(mode="after")
    def _groups(self) -> LFSSpace:
        if self.layer_groups is not None and self.layers_per_group is not None:
            raise ValueError("give layerGroups or layersPerGroup, not both")
        if self.layer_groups is None and self.layers_per_group is None:
            self.layer_groups = 4
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: list each method once")
        return self


class DISSpace(_Spec):
    """Depth-wise integration: per depth position, which experts' layers to stack, in which order, how scaled."""

    type: Literal["DIS"] = Field(description="LFS (layer-wise fusion) or DIS (depth-wise integration)")
    max_depth: int | None = Field(
        default=None, ge=1, description="cap on the merged model's layers (default: 1.5x the base's)"
    )
    scale_range: tuple[float, float] = Field(
        default=(0.8, 1.2), description="range of the output scale per position (1 leaves the stream unchanged)"
    )

    @model_validator(mode="after")
    def _scales(self) -> DISSpace:
        low, high = self.scale_range
        if not 0 < low <= 1 <= high:
            raise ValueError(
                f"scaleRange {list(self.scale_range)} must satisfy 0 < low <= 1 <= high (1 keeps an expert as it is)"
            )
        return self


class Objective(TaskSpec):
    """A task to maximise accuracy on; `weight` counts in the weighted sum (objectiveMode: weighted)."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=AliasGenerator(validation_alias=to_camel, serialization_alias=to_camel),
        populate_by_name=True,
    )
    weight: float = Field(default=1.0, gt=0, description="weight in the weighted mean (objectiveMode: weighted)")

    def task(self) -> TaskSpec:
        return TaskSpec.model_validate(self.model_dump(exclude={"weight"}))


class Fidelity(_Spec):
    min_samples: int = Field(default=100, ge=1, description="samples per objective at the lowest rung")
    max_samples: int = Field(default=1000, ge=1, description="samples per objective at the top rung")
    reduction_factor: int = Field(default=3, ge=2, description="eta: each rung keeps the top 1/eta")
    brackets: int | None = Field(
        default=None,
        ge=1,
        description="Hyperband brackets to run, the most aggressive first (1: every trial starts at minSamples, "
        "ASHA); unset: all of them",
    )

    @model_validator(mode="after")
    def _order(self) -> Fidelity:
        if self.min_samples > self.max_samples:
            raise ValueError(
                f"minSamples ({self.min_samples}) is above maxSamples ({self.max_samples}); "
                "lower minSamples or raise maxSamples"
            )
        return self


class Budget(_Spec):
    max_trials: int = Field(default=100, ge=1, description="merges to try (the initial design included)")
    parallel_trials: int = Field(default=2, ge=1, description="trial runs at the same time")
    max_failed_trials: int = Field(default=20, ge=1, description="the search stops as Failed after this many")
    max_retries: int = Field(default=2, ge=0, description="re-runs of a trial run after infrastructure failures")
    max_samples: int | None = Field(default=None, ge=1, description="stop after evaluating this many samples in all")
    max_gpu_seconds: float | None = Field(default=None, gt=0, description="stop after this much GPU time in all")


class Search(_Spec):
    sampler: Literal["tpe", "random"] = Field(default="tpe", description="Optuna sampler: TPE or random search")
    seed: int = Field(default=0, description="seeds the sampler, the brackets' draw and DARE")
    objective_mode: Literal["weighted", "pareto"] = Field(
        default="weighted", description="weighted: maximise the weighted sum; pareto: keep the Pareto front"
    )
    multi_fidelity: bool = Field(default=True, description="false: every trial at maxSamples (no promotion)")


class SecretKeyRef(_Spec):
    name: str = Field(description="a Secret in the search's namespace")


class Storage(_Spec):
    database_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret with key `url`: the study's SQLAlchemy URL (PostgreSQL on a cluster)"
    )
    s3_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally AWS_ENDPOINT_URL"
    )


class Toleration(_Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Trial(_Spec):
    image: str = Field(default="ghcr.io/mergesearch/trial-runner:0.1.0", description="trial runner image")
    backend: Literal["vllm", "hf"] = Field(default="vllm", description="evaluation engine")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="passed to the backend (e.g. max_model_len)")
    resources: dict[str, dict[str, int | str]] = Field(
        default_factory=lambda: {"limits": {"nvidia.com/gpu": 1}}, description="container resources (limits, requests)"
    )
    timeout_seconds: int = Field(default=3600, ge=60, description="a trial run's deadline")
    node_selector: dict[str, str] = Field(default_factory=dict, description="trial pods' nodeSelector")
    tolerations: list[Toleration] = Field(default_factory=list, description="trial pods' tolerations")
    service_account_name: str | None = Field(default=None, description="trial pods' service account")
    cache_volume: dict[str, Any] | None = Field(
        default=None, description="volume for the node's shared weight cache (e.g. {hostPath: {path: /var/cache/ms}})"
    )
    reuse_pods: bool = Field(
        default=False,
        description="run trial after trial in long-lived worker pods, one per parallel trial, which import the "
        "backend once (a fresh pod per run pays it every time)",
    )


class Output(_Spec):
    uri: str | None = Field(default=None, description="where the best merged model and its recipe go")


class MergeSearchSpec(_Spec):
    models: Models = Field(description="the base model and the experts fine-tuned from it")
    search_space: Annotated[LFSSpace | DISSpace, Field(discriminator="type")] = Field(
        description="what the search may choose: per layer group (LFS) or per depth position (DIS)"
    )
    objectives: list[Objective] = Field(min_length=1, description="the tasks whose accuracy the merge should maximise")
    fidelity: Fidelity = Field(
        default_factory=Fidelity, description="samples per objective from the first to the last rung"
    )
    budget: Budget = Field(default_factory=Budget, description="how much the search may spend, and how fast")
    search: Search = Field(default_factory=Search, description="the optimizer")
    trial: Trial = Field(default_factory=Trial, description="how trial pods run")
    storage: Storage = Field(default_factory=Storage, description="where credentials come from")
    output: Output = Field(default_factory=Output, description="where the best merge goes")
    suspend: bool = Field(default=False, description="stop launching trial runs; running ones finish")

    @model_validator(mode="after")
    def _consistent(self) -> MergeSearchSpec:
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError("objective names must be unique")
        if self.search.objective_mode == "pareto" and len(self.objectives) < 2:
            raise ValueError("search.objectiveMode pareto needs two or more objectives; use weighted for one")
        return self

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.models.experts]

    def model_uris(self) -> dict[str, str]:
        return {"base": self.models.base, **{e.name: e.uri for e in self.models.experts}}


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=40)]
    namespace: str | None = None


class MergeSearch(BaseModel):
    """The whole resource as a user writes it (`kubectl apply -f` or `mergesearch run`)."""

    model_config = ConfigDict(extra="allow")
    api_version: Literal[f"{API_GROUP}/{API_VERSION}"] = Field(alias="apiVersion")  # type: ignore[valid-type]
    kind: Literal["MergeSearch"]
    metadata: Metadata
    spec: MergeSearchSpec


class ManifestError(ValueError):
    """A manifest that cannot run; `field` is the dotted path at fault (camelCase, as written)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def _location(error: dict[str, Any]) -> str:
    parts = [str(p) for p in error["loc"] if not (isinstance(p, str) and p in ("LFS", "DIS"))]
    return ".".join(parts)


def parse_manifest(document: dict[str, Any]) -> MergeSearch:
    """Validate a manifest (already parsed YAML), raising `ManifestError` for the first problem."""
    try:
        return MergeSearch.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        raise ManifestError(_location(first), message) from None


def load_manifest(path: Path | str) -> MergeSearch:
    text = Path(path).read_text()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError("", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ManifestError("", f"{path} must hold one MergeSearch object")
    return parse_manifest(document)
