"""Fixtures of the install tests: the tree to test (with a placeholder CRD until the real one is generated)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .tree import InstallTree, install_tree


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> InstallTree:
    return install_tree(tmp_path_factory.mktemp("install"))


@pytest.fixture(scope="session")
def chart(tree: InstallTree) -> Path:
    return tree.chart
