"""Fixtures of the weight-store tests: a real S3 server (SeaweedFS), tiny real checkpoints, request counters.

Every test gets its own bucket on the session's server and its own cache directory; the environment is
what a Kubernetes Secret would give a trial pod, and nothing points boto3 anywhere but 127.0.0.1 (no
instance metadata, no config files, no proxy).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from mergesearch_trial_runner.store import ModelStore
from tests.store.store_helpers import FAST


@pytest.fixture(autouse=True)
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    env = s3_server.env(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        NO_PROXY="127.0.0.1,localhost",
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"t{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(cache: Path) -> ModelStore:
    return ModelStore(cache, settings=FAST)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real tiny Llama checkpoints: `single` (one safetensors file) and `sharded` (index + several shards)."""
    from mergesearch_trial_runner.testbed.models import random_llama

    root = tmp_path_factory.mktemp("tiny")
    return {
        "single": random_llama(root / "single", seed=0),
        "sharded": random_llama(root / "sharded", seed=1, max_shard_bytes=600_000),
    }
