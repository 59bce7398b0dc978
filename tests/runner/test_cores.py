"""The cores a trial may use: the container's CPU quota, read from cgroup files written here."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesearch_trial_runner.cores import cpu_quota_cores


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "400000 100000\n"}, 4),  # cgroup v2, a 4-CPU limit
        ({"cpu.max": "250000 100000\n"}, 2),  # 2.5 CPUs: whole cores, rounded down
        ({"cpu.max": "50000 100000\n"}, 1),  # 500m: never fewer than one thread
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "800000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_the_thread_count_follows_the_containers_cpu_quota(
    tmp_path: Path, files: dict[str, str], cores: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota_cores(tmp_path) == cores
