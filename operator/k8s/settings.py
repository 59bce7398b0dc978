"""The operator's own settings, from its environment (the chart sets them). Typed, documented, defaulted."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGESEARCH_")

    trial_image: str = Field(
        default="ghcr.io/mergesearch/trial-runner:0.1.0", description="trial image when a search names none"
    )
    database_secret: str = Field(
        default="mergesearch-db",
        description="Secret (key `url`) with the studies' database URL, unless a search names one",
    )
    s3_secret: str = Field(
        default="mergesearch-s3", description="Secret with S3 credentials, unless a search names one"
    )
    cache_host_path: str | None = Field(
        default=None, description="node directory shared by trial pods as their weight cache (none: per-pod emptyDir)"
    )
    reconcile_seconds: float = Field(default=5.0, gt=0, description="how often each search is reconciled")
    unschedulable_seconds: float = Field(
        default=900.0, gt=0, description="a trial pod unschedulable this long is failed (and retried)"
    )
    image_pull_seconds: float = Field(
        default=300.0, gt=0, description="a trial pod that cannot pull its image this long fails as a user error"
    )
    worker_idle_seconds: float = Field(
        default=60.0, gt=0, description="a worker pod (trial.reusePods) without a run this long is deleted"
    )
    worker_unreachable_seconds: float = Field(
        default=600.0, gt=0, description="a running worker pod that does not answer this long loses its run"
    )
    keep_failed_pods: int = Field(default=5, ge=0, description="failed trial pods kept per search for debugging")
    trial_uid: int = Field(default=1000, description="uid (and fsGroup) trial containers run as")
