"""Which cores the teacher and the students get when both run on one machine.

On one CPU machine a teacher replica and a student worker would otherwise share every core, and
the student's figure would include the teacher's compute, which separate machines would not. The
plan gives each side its own cores (`TeacherConfig.cpu_affinity`, `TrainConfig.cpu_affinity`) and
torch threads to match; where there are too few cores it says the sides share them. On an
embedded cluster the driver and Ray's own processes go to the teacher's side too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class CorePlan:
    teacher: list = field(default_factory=list)  # empty: not pinned
    student: list = field(default_factory=list)
    teacher_threads: int = 1
    student_threads: int = 1
    separated: bool = False
    note: str = ""


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def plan_cores(pin: bool, teacher_cores: int | None = None, student_cores: int | None = None,
               cores: list[int] | None = None) -> CorePlan:
    """Teacher gets the last `teacher_cores` cores, students the first `student_cores` (default:
    half each, teacher rounded down). Unpinned plans still size torch threads to the split."""
    cores = cores if cores is not None else available_cores()
    n = len(cores)
    t = teacher_cores if teacher_cores is not None else max(1, n // 2)
    s = student_cores if student_cores is not None else max(1, n - t)
    if not pin:
        return CorePlan(teacher_threads=t, student_threads=s,
                        note=f"not pinned (--no-pin): teacher {t} and student {s} torch threads on {n} cores")
    if t + s > n:
        return CorePlan(teacher_threads=max(1, min(t, n)), student_threads=max(1, min(s, n)),
                        note=f"{n} core(s) cannot give the teacher {t} and the students {s} of their own: "
                             "not pinned, they share the cores")
    return CorePlan(teacher=cores[n - t:], student=cores[:s], teacher_threads=t, student_threads=s,
                    separated=True,
                    note=f"teacher pinned to cores {cores[n - t:]} ({t} torch threads), students to "
                         f"{cores[:s]} ({s} threads)")


def keep_ray_on_teacher_cores(plan: CorePlan, address: str | None) -> list[int] | None:
    """Before an embedded cluster starts: put this driver, and so every process Ray starts (GCS,
    raylet, the Serve and Train controllers, idle workers), on the teacher's cores.

    Why: with the teacher busy on its cores, the scheduler moved these unpinned processes onto the
    students' core: 4.2 % of a remote student's core in a profiled run, none when no teacher runs.
    On separate machines the head node's processes run beside the teacher, not on a student GPU
    node. Student workers then pin themselves to their own cores (`pin_process` may widen a set).
    Does nothing on an existing cluster (`address` or $RAY_ADDRESS), when already connected, or
    when the plan does not separate the sides. Returns the driver's cores, or None.
    """
    import ray

    from teacher_service.affinity import pin_process

    if not plan.separated or address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return None
    plan.note += "; the driver and Ray's own processes on the teacher's cores"
    return pin_process(plan.teacher)
