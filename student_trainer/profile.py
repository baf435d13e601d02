"""Where a training step's time goes: reading data, waiting for the teacher, choosing the rows to
train on (data selection), converting its answers to tensors, the student's compute, and the
loop's own bookkeeping.

The remote teacher's cost to a student is the sum of small parts (a wait, a receive, a copy),
none of which shows in samples/s alone; `kd bench` reports these per mode so the gap to the
no-teacher run can be read off, not guessed. Times are the rank's own, per optimizer step.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Iterator, TypeVar

PARTS = ("data", "teacher_wait", "select", "convert", "compute", "other")
T = TypeVar("T")


class StepProfile:
    """Per-part seconds summed over the steps of one epoch. `wait_s` reads the teacher source's
    cumulative wait, which happens inside the step stream's `next()` (the prefetched answers are
    collected as the batch is handed out), so it is split out of the fetch time."""

    def __init__(self, wait_s: Callable[[], float]) -> None:
        self._wait_s = wait_s
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.steps = 0
        self.compute_cpu_s = 0.0  # the loop thread's CPU time inside `compute`
        self.first_wait_s = 0.0  # the first step's wait: filling the prefetch window, which nothing hides
        self.aside_s = 0.0  # work in the loop body that is not training (`aside`), in no part
        self._cpu_start = (time.process_time(), time.thread_time())  # made on the loop's thread

    def background_cpu_s(self) -> float:
        """CPU seconds this process spent outside the loop's thread since the profile began: Ray's
        core-worker threads sending requests and receiving answers, the Serve handle's router,
        data readers. Not a part of the step's wall time: on a free core it overlaps the step, on a
        shared one (a student pinned to one core) it is taken from the step's compute. Call it
        from the loop's thread."""
        process, thread = time.process_time(), time.thread_time()
        return max(0.0, (process - self._cpu_start[0]) - (thread - self._cpu_start[1]))

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """Yield `items`, charging each `next()` to data/teacher_wait and the caller's loop body,
        less what `part()` timed inside it, to other."""
        it = iter(items)
        while True:
            start, waited_before = time.perf_counter(), self._wait_s()
            try:
                item = next(it)
            except StopIteration:
                return
            fetched = time.perf_counter()
            waited = self._wait_s() - waited_before
            self.totals["teacher_wait"] += waited
            if not self.steps:
                self.first_wait_s = waited
            self.totals["data"] += max(0.0, fetched - start - waited)
            timed = self._timed()
            yield item
            body = time.perf_counter() - fetched
            self.totals["other"] += max(0.0, body - (self._timed() - timed))
            self.steps += 1

    def _timed(self) -> float:
        return self.totals["select"] + self.totals["convert"] + self.totals["compute"] + self.aside_s

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Time work inside the loop body that is not a training step's (an evaluation of the
        curve): charged to no part, so the step profile stays the training's."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.aside_s += time.perf_counter() - start

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time a part of the loop body; for `compute` also the loop thread's CPU time, so a
        compute part that grew reads as more CPU for the same work (a slower core: caches or
        memory shared with a busy neighbour) or as time the thread was not running (other
        processes on its core). Call it from the loop's thread."""
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start
            if name == "compute":
                self.compute_cpu_s += time.thread_time() - cpu

    def as_metrics(self) -> dict[str, float]:
        """`step_<part>_ms`: mean milliseconds per step of each part; `step_background_cpu_ms`
        (`background_cpu_s` per step); `step_compute_cpu_ms` (the loop thread's CPU in compute);
        `teacher_wait_first_step_ms`: of the teacher wait, the first step's (the window filling
        at the epoch's start: a fixed cost that a short run spreads over few steps, a long one
        over many). Empty before the first step."""
        if not self.steps:
            return {}
        metrics = {f"step_{p}_ms": round(1000.0 * s / self.steps, 3) for p, s in self.totals.items()}
        metrics["step_compute_cpu_ms"] = round(1000.0 * self.compute_cpu_s / self.steps, 3)
        metrics["teacher_wait_first_step_ms"] = round(1000.0 * self.first_wait_s, 3)
        metrics["step_background_cpu_ms"] = round(1000.0 * self.background_cpu_s() / self.steps, 3)
        return metrics
