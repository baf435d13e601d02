"""Where each core's time goes while `kd bench` runs: per-core busy and steal time, and every
process's CPU, sampled every half second from /proc (Linux).

The students section pins the student worker to one core; this says, for each student worker's
steady training (the samples where it used > 0.8 of a core), how much of that core's busy time
was the student and how much other processes took, and which processes used CPU meanwhile (with
their core affinity). Run the sampler on the teacher's core, beside the benchmark:

    taskset -c 1 python benchmarks/core_usage.py record /tmp/cores.jsonl &
    kd bench --preset cpu --sections students --modes none remote cache --repeats 1 --out /tmp/bench
    kill %1; python benchmarks/core_usage.py report /tmp/cores.jsonl --student-core 0
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def core_times() -> dict[str, dict[str, float]]:
    """Seconds per core since boot: busy (user, nice, system, irq, softirq), steal, idle."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
                out[name] = {"busy": (user + nice + system + irq + softirq) / HZ, "steal": steal / HZ,
                             "idle": (idle + iowait) / HZ}
    return out


def process_name(pid: int) -> str:
    """A short name: Ray's process title (ray::RayTrainWorker, ray::ServeReplica...) or the program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    if not cmd:
        return "?"
    first = cmd.split(" ")[0]
    if first.startswith("ray::"):
        return first.split(".")[0]
    for program in ("raylet", "gcs_server", "log_monitor", "dashboard"):  # Ray's daemons: the program's path
        if program in first:
            return program
    for script in ("default_worker", "kd bench", "core_usage"):  # Python scripts: their arguments
        if script in cmd:
            return script
    return os.path.basename(first)[:40]


def process_times() -> dict[int, tuple[float, list[int]]]:
    """pid -> (CPU seconds so far, core affinity)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rfind(")") + 2:].split()
            out[int(entry)] = ((int(fields[11]) + int(fields[12])) / HZ, sorted(os.sched_getaffinity(int(entry))))
        except (OSError, ValueError, IndexError):
            continue
    return out


def record(path: str, period: float) -> None:
    """Append one JSON line per period: time, per-core deltas, per-process CPU deltas (> 0)."""
    prev_cores, prev_procs, prev_t = core_times(), process_times(), time.time()
    with open(path, "w") as out:
        while True:
            time.sleep(period)
            cores, procs, now = core_times(), process_times(), time.time()
            rec = {"t": now, "dt": now - prev_t,
                   "cores": {c: {k: round(v - prev_cores[c][k], 3) for k, v in cores[c].items()} for c in cores},
                   "procs": {}}
            for pid, (cpu, affinity) in procs.items():
                if pid in prev_procs and cpu > prev_procs[pid][0]:
                    rec["procs"][str(pid)] = [process_name(pid), round(cpu - prev_procs[pid][0], 3), affinity]
            out.write(json.dumps(rec) + "\n")
            out.flush()
            prev_cores, prev_procs, prev_t = cores, procs, now


def report(path: str, student_core: int, top: int) -> None:
    recs = [json.loads(line) for line in open(path)]
    core = f"cpu{student_core}"
    steady = defaultdict(list)  # student worker pid -> its samples above 0.8 core
    for r in recs:
        for pid, (name, cpu, affinity) in r["procs"].items():
            if affinity == [student_core] and name.startswith("ray::RayTrainWorker") and cpu / r["dt"] > 0.8:
                steady[pid].append(r)
    for pid, rs in sorted(steady.items(), key=lambda kv: kv[1][0]["t"]):
        if len(rs) < 4:
            continue
        wall = sum(r["dt"] for r in rs)
        busy = sum(r["cores"][core]["busy"] for r in rs)
        steal = sum(r["cores"][core]["steal"] for r in rs)
        mine = sum(r["procs"][pid][1] for r in rs)
        others = defaultdict(float)
        for r in rs:
            for p, (name, cpu, affinity) in r["procs"].items():
                if p != pid:
                    others[(p, name, tuple(affinity))] += cpu
        print(f"student worker {pid} at t+{rs[0]['t'] - recs[0]['t']:.0f} s, {wall:.1f} s steady: "
              f"{mine / wall:.3f} of core {student_core}; other processes on that core "
              f"{max(0.0, busy - mine) / wall * 100:.1f} % of the time; steal {steal / wall * 100:.1f} %; "
              f"all other processes {sum(others.values()) / wall * 100:.0f} % of one core:")
        for (p, name, affinity), cpu in sorted(others.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {cpu:6.2f} s  pid {p} {name} (cores {list(affinity)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="sample until killed")
    r.add_argument("out")
    r.add_argument("--period", type=float, default=0.5)
    s = sub.add_parser("report", help="per student worker: its core's time, and who else used CPU")
    s.add_argument("path")
    s.add_argument("--student-core", type=int, default=0)
    s.add_argument("--top", type=int, default=6)
    args = p.parse_args()
    if args.command == "record":
        record(args.out, args.period)
    else:
        report(args.path, args.student_core, args.top)


if __name__ == "__main__":
    main()
