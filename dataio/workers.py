"""Loader worker processes: how many to start by default (one per CPU this process may use, minus one for the
main process), and how they keep the memory they free."""

from __future__ import annotations

import ctypes
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


# glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_FREED_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """Lets this process reuse the memory it frees instead of handing it back to the system (glibc only).

    A worker allocates and frees the same few large buffers for every sample (a decoded 480x640 frame is
    0.9 MB). By default glibc maps each one afresh and returns it at once, and touching the new pages
    costs the worker as much as copying them; with mmap for blocks up to 64 MB off and up to 256 MB of
    freed heap kept, every sample reuses the last one's pages. Returns whether it took effect.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 64 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
