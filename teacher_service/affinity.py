"""Pinning a process to CPU cores, so a teacher replica and student workers on one machine run
on separate cores, as they would on separate machines (the benchmark suite relies on this).

Linux only; elsewhere (or with no cores given) it does nothing and says so by returning None.
"""
from __future__ import annotations

import os
from collections.abc import Sequence


def pin_process(cores: Sequence[int] | None) -> list[int] | None:
    """Restrict every thread of this process to `cores`; threads started later inherit it.

    `os.sched_setaffinity(0, ...)` pins only the calling thread, and torch's intra-op pool or a
    Serve replica's forward thread may already exist, so every task in /proc/self/task is pinned.
    Returns the cores now in force, or None when nothing was done.
    """
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None
    wanted = {int(c) for c in cores}
    unknown = wanted - set(os.sched_getaffinity(0))
    if unknown:
        raise ValueError(f"cpu_affinity: cores {sorted(unknown)} are not available to this process "
                         f"(available: {sorted(os.sched_getaffinity(0))})")
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]
    for tid in tasks:
        try:
            os.sched_setaffinity(tid, wanted)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            continue
    os.sched_setaffinity(0, wanted)
    return sorted(os.sched_getaffinity(0))
