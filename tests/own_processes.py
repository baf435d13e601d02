"""Find and stop the processes a test started, by a marker in their command line (e.g. a Ray temp
dir only they use): `ray stop` or killing by name would also hit other clusters on the machine."""
from __future__ import annotations

import os
import signal
from pathlib import Path


def own_processes(marker: str) -> list[int]:
    """Pids (not this process) whose command line contains `marker`."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(pid_dir.name))
    return found


def with_descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them: a raylet's agents, workers and job drivers rename
    themselves (`ray::DashboardAgent`), so only their parentage says whose they are."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def stop_own_processes(marker: str) -> list[int]:
    """SIGKILL every process `own_processes(marker)` finds and their descendants (all collected
    before the first kill, since orphans are re-parented); returns their pids."""
    pids = with_descendants(own_processes(marker))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids
