"""How many cores this process may use: its CPU affinity, capped by its container's CPU quota.

Both the trial runner (a pod's torch threads) and the local executor (sharing cores among parallel
runs) size thread pools from it. No torch here: the operator imports it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpu_quota_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole cores the container's CPU quota allows (cgroup v2 `cpu.max`, or v1's CFS files), at least 1;
    None without a quota. torch sizes its thread pool by the node's cores, not the pod's CPU limit: 64
    threads in a 4-core pod spin waiting for each other (locally, oversubscription made a search 16x
    slower; see the local executor)."""
    try:
        if (v2 := cgroup / "cpu.max").exists():
            quota, period = v2.read_text().split()[:2]
        else:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1"):
        return None
    return max(1, int(quota) // int(period))


def usable_cores() -> int:
    """The cores this process may run on (its affinity), capped by the container's CPU quota."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota_cores()
    return cores if quota is None else min(cores, quota)
