"""Untrained tiny Llama checkpoints for engine tests (fast to build, real files), mergekit 0.1.5."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergesearch_trial_runner.testbed.models import TinyLlama, random_llama


@pytest.fixture(scope="session")
def mergekit_yaml() -> Path:
    """mergekit 0.1.5's `mergekit-yaml` (its `mergekit-multi` lies beside it), from its own environment."""
    path = os.environ.get("MERGEKIT_YAML")
    if not path or not Path(path).exists():
        pytest.fail("MERGEKIT_YAML must point at mergekit 0.1.5's mergekit-yaml; `make test` sets it up")
    return Path(path)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, a, b: three fp32 tiny Llamas of one shape; `sharded` is `a` split over several files."""
    root = tmp_path_factory.mktemp("models")
    return {
        "base": random_llama(root / "base", seed=0),
        "a": random_llama(root / "a", seed=1),
        "b": random_llama(root / "b", seed=2),
        "sharded": random_llama(root / "sharded", seed=1, max_shard_bytes=400_000),
    }


@pytest.fixture(scope="session")
def tied_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    shape = TinyLlama(tie_word_embeddings=True)
    return {name: random_llama(root / name, seed=seed, shape=shape) for seed, name in enumerate(("base", "a", "b"))}
