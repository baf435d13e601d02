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
    The set may be wider than the one the process started with (a Ray worker spawned by a raylet
    that `kd bench` keeps on the teacher's cores pins itself to the students' cores); only cores
    outside the machine or the process's cgroup are refused.
    Returns the cores now in force, or None when nothing was done.
    """
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None
    wanted = {int(c) for c in cores}
    before = os.sched_getaffinity(0)
    try:  # the calling thread first: it checks the cores (a process may widen its own set within its cgroup)
        os.sched_setaffinity(0, wanted)
    except OSError as e:
        raise ValueError(f"cpu_affinity: cores {sorted(wanted)} cannot be used by this process ({e})") from e
    got = os.sched_getaffinity(0)
    if got != wanted:  # the kernel keeps only the cores the cgroup allows
        os.sched_setaffinity(0, before)
        raise ValueError(f"cpu_affinity: cores {sorted(wanted - got)} are not available to this process")
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tasks = []
    for tid in tasks:
        try:
            os.sched_setaffinity(tid, wanted)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            continue
    return sorted(os.sched_getaffinity(0))
