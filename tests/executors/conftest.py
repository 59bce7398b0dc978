"""Each executor in its harness (see `harnesses.py`); the ones that run real trials are slow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.executors.harnesses import Harness, LocalHarness, PodHarness, WorkerPodHarness


@pytest.fixture(
    params=[
        pytest.param("local", marks=pytest.mark.slow),
        "pod",
        pytest.param("worker-pod", marks=pytest.mark.slow),
    ]
)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "local":
        made: Harness = LocalHarness(request.getfixturevalue("world"), tmp_path)
    elif request.param == "worker-pod":
        made = WorkerPodHarness(request.getfixturevalue("world"), tmp_path)
    else:
        made = PodHarness(tmp_path)
    yield made
    made.close()
