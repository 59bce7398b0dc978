"""Fixtures of the search tests: storages and the synthetic executor (helpers live in `searches.py`)."""

from __future__ import annotations

import optuna
import pytest

from mergesearch_operator.search.storage import SingleWriterStorage
from tests.search.synthetic import SyntheticExecutor


@pytest.fixture
def storage() -> SingleWriterStorage:
    """The controller's storage over an in-memory one: its logic, fast. Real databases have tests of their own."""
    return SingleWriterStorage(optuna.storages.InMemoryStorage())


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def executor() -> SyntheticExecutor:
    return SyntheticExecutor()
