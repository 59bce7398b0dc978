"""The MergeSearch resource: one schema for the manifest parser, the CRD and the documentation.

Field names are camelCase in YAML (Kubernetes' convention) and snake_case in Python. Everything a schema
can say (types, enums, bounds, defaults) is said here so that the generated CRD's OpenAPI validation says
it too; cross-field rules (min below max, methods that need experts) are model validators whose
messages name the field and the fix; `trial.engineArgs` is checked against the chosen backend's settings
model (the trial runner's own). `parse_manifest` reports every problem at once, one per line, unknown
fields first with the closest valid name. Checks that need the models themselves (an expert whose shapes
differ from the base) are in `preflight`.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from mergesearch_trial_runner.evaluate.registry import get_backend
from mergesearch_trial_runner.plan.methods import default_space_methods, searchable_methods
from mergesearch_trial_runner.tasks import TaskSpec

from .podtemplate import (
    DNS_SUBDOMAIN,
    Affinity,
    EnvVar,
    Volume,
    VolumeMount,
    check_env,
    check_metadata,
    check_mounts,
    check_volumes,
)

API_GROUP = "mergesearch.io"
API_VERSION = "v1alpha1"
KIND = "MergeSearch"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _searchable(name: str) -> str:
    """A method the LFS space can search, as declared in the runner's `plan.methods` (read when validating,
    so a method declared there is searchable here with no other change)."""
    if name not in searchable_methods():
        raise ValueError(f"{name!r} is not a searchable merge method; use one of {list(searchable_methods())}")
    return name


SearchableMethod = Annotated[
    str,
    AfterValidator(_searchable),
    Field(json_schema_extra=lambda schema: schema.update(enum=list(searchable_methods()))),
]


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
    methods: list[SearchableMethod] = Field(
        default_factory=default_space_methods,
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
    # The default was null (every bracket) before the measurements of docs/benchmarks.md chose ASHA; a
    # study started then keeps null as accepted, and still validates.
    brackets: int | None = Field(
        default=1,
        ge=1,
        description="Hyperband brackets to run, the most aggressive first: 1 (the default) starts every trial at "
        "minSamples (ASHA); null, or as many as there are rungs, is full Hyperband, whose later brackets start "
        "trials at higher rungs",
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


REMOTE_CODE = "trust_remote_code"


def _names_key(value: Any, key: str) -> bool:
    """Whether `key` is a key of `value` or of any mapping nested in it."""
    if isinstance(value, dict):
        return key in value or any(_names_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_names_key(v, key) for v in value)
    return False


def check_engine_args(backend: str, engine_args: dict[str, Any]) -> None:
    """Refuse `engineArgs` that `backend` does not take (every trial would fail on them), naming the key,
    the backend and its valid keys; and any `trust_remote_code`, at any depth."""
    if _names_key(engine_args, REMOTE_CODE):
        raise ValueError(
            f"{REMOTE_CODE} cannot be set: trials run only model code that ships with transformers and vLLM, "
            "never Python code from a checkpoint; use a model whose architecture they support"
        )
    model = get_backend(backend).settings
    try:
        model.model_validate(engine_args)
    except ValidationError as exc:
        valid = sorted(model.model_fields)
        problems = []
        for error in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
            key = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                problems.append(
                    f"`{key}` is not a setting of backend {backend}{hint}; its settings are {', '.join(valid)}"
                )
            else:
                problems.append(f"`{key}`: {message}" if key else message)
        raise ValueError("; ".join(problems)) from None


class Trial(_Spec):
    image: str | None = Field(
        default=None,
        description="trial runner image; unset: the operator's own (the chart's trial.image value, "
        "MERGESEARCH_TRIAL_IMAGE), so one setting points every search at a private registry",
    )
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

    # The pod template: what cluster admins set on any workload, in Kubernetes' own shapes (podtemplate).
    image_pull_secrets: list[SecretKeyRef] = Field(
        default_factory=list,
        description="Secrets (type kubernetes.io/dockerconfigjson) for pulling the trial image from a private "
        "registry, as in a pod spec: [{name: regcred}]",
    )
    affinity: Affinity | None = Field(
        default=None,
        description="trial pods' affinity, as in a pod spec (nodeAffinity, podAffinity, podAntiAffinity): e.g. "
        "prefer nodes with a GPU type, or keep trial pods apart",
    )
    priority_class_name: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="a PriorityClass for trial pods (e.g. a low one, so that serving workloads preempt searches)",
    )
    runtime_class_name: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="a RuntimeClass for trial pods (e.g. nvidia, where the GPU runtime is not the default)",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="extra environment variables of the trial container, as in a pod spec ({name, value} or "
        "{name, valueFrom}); the operator's own (MERGESEARCH_TRIAL_SPEC, MERGESEARCH_TERMINATION_LOG, "
        "MERGESEARCH_WORKER_TOKEN, POD_IP, AWS_*) are refused",
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        description="extra volumes of trial pods, as in a pod spec (e.g. {name: models, persistentVolumeClaim: "
        "{claimName: models}}); the names weight-cache and scratch are the operator's",
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        description="mounts of trial.volumes into the trial container, as in a pod spec ({name, mountPath}); "
        "not at the operator's own paths (/var/cache/mergesearch, /scratch, /dev/termination-log)",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="extra labels of trial pods (e.g. for cost allocation or network policies); the operator's "
        "own (mergesearch.io/*, app.kubernetes.io/managed-by, app.kubernetes.io/name) are refused",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="extra annotations of trial pods (e.g. for a service mesh or log shipper); keys under "
        "mergesearch.io/ are the operator's",
    )

    @field_validator("engine_args")
    @classmethod
    def _backend_takes(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "backend" in info.data:  # else the backend's own error is reported
            check_engine_args(info.data["backend"], value)
        return value

    @field_validator("labels", "annotations")
    @classmethod
    def _metadata(cls, values: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        return dict(check_metadata(info.field_name or "", values))

    @field_validator("env")
    @classmethod
    def _env(cls, env: list[EnvVar]) -> list[EnvVar]:
        return check_env(env)

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, volumes: list[Volume]) -> list[Volume]:
        return check_volumes(volumes)

    @field_validator("volume_mounts")
    @classmethod
    def _mounts(cls, mounts: list[VolumeMount], info: ValidationInfo) -> list[VolumeMount]:
        if "volumes" not in info.data:  # the volumes were refused: that error is the one to show
            return mounts
        return check_mounts(mounts, info.data["volumes"])


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

    model_config = ConfigDict(extra="forbid")
    api_version: Literal[f"{API_GROUP}/{API_VERSION}"] = Field(alias="apiVersion")  # type: ignore[valid-type]
    kind: Literal["MergeSearch"]
    metadata: Metadata
    spec: MergeSearchSpec
    status: dict[str, Any] | None = Field(default=None, description="the operator's; a manifest may carry it")


class ManifestError(ValueError):
    """A manifest that cannot run: one line per problem, each `field: message`, the field a dotted path as
    written (camelCase, list indices in brackets). `field` is the first, most important problem's; `problems`
    holds every (field, message)."""

    def __init__(self, field: str, message: str, *, more: Sequence[tuple[str, str]] = ()):
        self.problems = [(field, message), *more]
        super().__init__("\n".join(f"{f}: {m}" if f else m for f, m in self.problems))
        self.field = field


def _unwrap(annotation: Any) -> Any:
    """`X | None` as X; other types as they are."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _alias(name: str, info: Any) -> str:
    return info.validation_alias if isinstance(info.validation_alias, str) else info.alias or name


def _field_names(node: Any) -> list[str]:
    """The keys a user may write in a mapping of type `node` (none where the schema does not list them)."""
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return [_alias(name, info) for name, info in node.model_fields.items()]
    return []


def _member(union: Any, part: object) -> Any:
    """The member of `union` that pydantic's location `part` tags (a discriminator value or a type name)."""
    for member in get_args(union):
        tags = {getattr(member, "__name__", str(member))}
        if isinstance(member, type) and issubclass(member, BaseModel) and "type" in member.model_fields:
            tags |= set(get_args(member.model_fields["type"].annotation))
        if part in tags:
            return member
    return None


def _walk(loc: Sequence[int | str]) -> tuple[str, Any]:
    """A pydantic error location as the user's dotted path (union tags left out, indices in brackets) and
    the type of the mapping that holds its last key (None where the schema does not say)."""
    path, node, parent = "", MergeSearch, None
    for part in loc:
        node = _unwrap(node)
        if get_origin(node) in (Union, types.UnionType) and (member := _member(node, part)) is not None:
            node = member
            continue
        parent = node
        if isinstance(part, int):
            path += f"[{part}]"
            node = get_args(node)[0] if get_origin(node) in (list, tuple) else None
            continue
        path += f".{part}" if path else str(part)
        if get_origin(node) is dict:
            node = get_args(node)[1]
        elif isinstance(node, type) and issubclass(node, BaseModel):
            node = next((i.annotation for n, i in node.model_fields.items() if part in (n, _alias(n, i))), None)
        else:
            node = None
    return path, parent


def _problem(error: Any) -> tuple[str, str]:
    path, parent = _walk(error["loc"])
    if error["type"] != "extra_forbidden":
        return path, error["msg"].removeprefix("Value error, ")
    valid = _field_names(parent)
    close = difflib.get_close_matches(str(error["loc"][-1]), valid, n=1)
    if close:
        return path, f"unknown field; did you mean `{close[0]}`?"
    return path, f"unknown field; the fields here are {', '.join(valid)}"


def parse_manifest(document: dict[str, Any]) -> MergeSearch:
    """Validate a manifest (already parsed YAML), raising one `ManifestError` that lists every problem,
    unknown fields first (a misspelt key is also the cause of the `Field required` that follows it)."""
    try:
        return MergeSearch.model_validate(document)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # stable: pydantic's order
        problems: dict[str, list[str]] = {}
        for error in errors:
            path, message = _problem(error)
            if message not in problems.setdefault(path, []):
                problems[path].append(message)  # a union's members each report the same field
        (first, *rest) = [(path, "; ".join(messages)) for path, messages in problems.items()]
        raise ManifestError(*first, more=rest) from None


def load_manifest(path: Path | str) -> MergeSearch:
    text = Path(path).read_text()
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError("", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ManifestError("", f"{path} must hold one MergeSearch object")
    return parse_manifest(document)
