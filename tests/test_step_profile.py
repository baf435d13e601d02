"""The step profile's accounting (student_trainer/profile.py) on a scripted clock: each part gets
exactly the time spent in it, the teacher's wait is split out of the fetch."""
from __future__ import annotations

import pytest

from student_trainer import profile as profile_module
from student_trainer.profile import StepProfile


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.wait = 0.0

    def advance(self, seconds: float, waiting: float = 0.0) -> None:
        self.now += seconds
        self.wait += waiting


def test_each_part_gets_its_own_time_and_the_wait_is_split_from_the_fetch(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(profile_module.time, "perf_counter", lambda: clock.now)
    cpu = {"loop": 0.0, "other": 0.0}  # CPU seconds of the loop's thread and of the rest of the process
    monkeypatch.setattr(profile_module.time, "thread_time", lambda: cpu["loop"])
    monkeypatch.setattr(profile_module.time, "process_time", lambda: cpu["loop"] + cpu["other"])

    def stream():
        for waiting in (0.030, 0.004):  # the first step waits for the window to fill, the next less
            clock.advance(0.010 + waiting, waiting=waiting)  # 10 ms reading, then blocked on the teacher
            yield "batch"

    prof = StepProfile(lambda: clock.wait)
    for _ in prof.iterate(stream()):
        with prof.part("select"):  # data selection: scoring the super-batch, taking its best rows
            clock.advance(0.003)
        with prof.part("convert"):
            clock.advance(0.001)
        with prof.part("compute"):
            clock.advance(0.050)
            cpu["loop"] += 0.045  # 5 ms of the 50 the loop's thread was not running (another process was)
            cpu["other"] += 0.003  # e.g. Ray's threads receiving the next answer meanwhile
        clock.advance(0.002)  # the loop's own work (events, progress)
    assert prof.steps == 2
    assert prof.as_metrics() == pytest.approx({"step_data_ms": 10.0, "step_teacher_wait_ms": 17.0,
                                               "teacher_wait_first_step_ms": 30.0, "step_compute_cpu_ms": 45.0,
                                               "step_select_ms": 3.0, "step_convert_ms": 1.0, "step_compute_ms": 50.0,
                                               "step_other_ms": 2.0, "step_background_cpu_ms": 3.0})


def test_no_step_no_figures():
    assert StepProfile(lambda: 0.0).as_metrics() == {}


def test_background_cpu_counts_other_threads_and_not_the_loops_own():
    """On the real clocks: a thread that burns CPU shows in `step_background_cpu_ms`; the loop's
    own busy work does not."""
    import threading
    import time

    def burn(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    prof = StepProfile(lambda: 0.0)
    for _ in prof.iterate(["batch"]):
        burn(0.3)  # the loop's thread
        worker = threading.Thread(target=burn, args=(0.2,))
        worker.start()
        worker.join()
    background = prof.as_metrics()["step_background_cpu_ms"]
    assert 190.0 <= background < 300.0, background
