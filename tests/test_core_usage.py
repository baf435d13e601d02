"""benchmarks/core_usage.py: the attribution of a student's core during its steady training, on a
scripted sample file (the student used 90 % of core 0, which was busy 96 %: 6 % went to others)."""
from __future__ import annotations

import json
import os

from benchmarks import core_usage


def test_the_student_core_is_split_into_the_student_and_everyone_else(tmp_path, capsys):
    samples = []
    for i in range(6):
        samples.append({"t": 100.0 + i, "dt": 1.0,
                        "cores": {"cpu0": {"busy": 0.96, "steal": 0.01, "idle": 0.04},
                                  "cpu1": {"busy": 0.5, "steal": 0.0, "idle": 0.5}},
                        "procs": {"11": ["ray::RayTrainWorker", 0.90, [0]],
                                  "12": ["raylet", 0.10, [0, 1]],
                                  "13": ["ray::ServeReplica:app:TeacherDeployment", 0.40, [1]]}})
    path = tmp_path / "cores.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    core_usage.report(str(path), student_core=0, top=5)
    out = capsys.readouterr().out
    assert "0.900 of core 0" in out and "other processes on that core 6.0 %" in out and "steal 1.0 %" in out
    assert "pid 13 ray::ServeReplica" in out and "50 % of one core" in out  # (0.1 + 0.4) per second


def test_it_reads_this_machines_cores_and_processes():
    cores = core_usage.core_times()
    assert cores and all({"busy", "steal", "idle"} <= set(v) for v in cores.values())
    cpu, affinity = core_usage.process_times()[os.getpid()]
    assert cpu >= 0 and affinity == sorted(os.sched_getaffinity(0))
    assert core_usage.process_name(os.getpid()) != "?"
