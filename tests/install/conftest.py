"""Fixtures of the install tests: the tree to test, the repository's own chart and manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.install.tree import REPO, InstallTree


@pytest.fixture(scope="session")
def tree() -> InstallTree:
    return InstallTree(REPO)


@pytest.fixture(scope="session")
def chart(tree: InstallTree) -> Path:
    return tree.chart
