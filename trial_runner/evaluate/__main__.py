"""`python -m mergesearch_trial_runner.evaluate JOB.json OUT.json`: see `job.py`."""

from __future__ import annotations

import os
import sys

from .job import main

if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
    # `python -m` puts the working directory first on sys.path, and torch hands sys.path to the Python
    # children it starts as PYTHONPATH (Inductor's SIMD probe). Run from the repository root, its
    # `operator/` folder then hides the standard library's `operator` in those children, the probe
    # fails, and vLLM's compiled kernels lose SIMD (or fail to build). The package is installed, so
    # the working directory is not needed here.
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
    sys.exit(main())
