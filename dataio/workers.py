"""How many loader workers to start by default: one per CPU this process may use, minus one for the main process."""

from __future__ import annotations

import os

MAX_WORKERS = 15  # past this, workers mostly contend for memory bandwidth and the LMDB page cache


def default_workers(reserve: int = 1, most: int = MAX_WORKERS) -> int:
    """min(usable CPUs - `reserve`, `most`), at least 0 (0: load in the main process).

    Usable CPUs are the ones this process is allowed to run on (`os.sched_getaffinity`, which containers and
    `taskset` restrict), else `os.cpu_count()`.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(cpus - reserve, most))
