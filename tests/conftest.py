"""Fixtures shared by every test: tiny real models, built once per session (and cached across runs).

Imports: `tests` is a package, every folder in it too, and pytest imports test modules by their package
name (its default `prepend` mode puts the repository root on sys.path). Helpers are imported absolutely,
from named modules, never from a conftest.py and never relatively: `from tests.support.kube import
KubeServer`, `from tests.search.searches import manifest`. Benchmarks import them the same way
(`python -m bench.NAME` from the repository root).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where the trained tiny-model world is cached between test runs."""
    path = Path(os.environ.get("MERGESEARCH_CACHE", Path.home() / ".cache" / "mergesearch"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def world(cache_dir: Path):
    """The trained tiny-model world: a base, one expert per synthetic task, and task splits."""
    from mergesearch_trial_runner.testbed.models import build_world

    return build_world(cache_dir)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS `weed mini`) on free loopback ports, for the session; see tests/support/s3.py."""
    from tests.support.s3 import s3_server as running_s3_server

    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL 15 server on a free loopback port; see tests/support/postgres.py."""
    from tests.support.postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()
