"""Dynamic batching sized in samples that forms a batch only when the forward is free, and
shares the teacher between runs by weight.

Serve's `@serve.batch` (ray 2.60 `_process_batches`) seals the next batch `batch_wait_timeout_s`
after its first request even while the previous forward still runs, so requests arriving during
a forward are split into many small batches. `SampleBatcher` gathers while the forward is busy.

Fair share is start-time fair queueing (Goyal et al., 1997) over runs: each request gets a start
tag max(virtual clock, its run's previous finish tag) and a finish tag start + samples / weight;
batches take the waiting request with the smallest start tag. Under contention a run of weight w
gets w / (sum of the waiting runs' weights) of the samples computed, a run that was idle gets no
credit for the time it was idle, and no waiting run starves.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Queued:
    """One request waiting for (or in) a forward: its size in samples, arrival time and fair-share tags."""

    request: Any
    size: int
    arrived: float
    future: asyncio.Future | None
    run: str = ""
    start_tag: float = 0.0


class SampleBatcher:
    """Dynamic batching sized in samples that forms a batch only when the forward is free.

    While a forward runs, arrivals queue; when it ends, the next batch takes waiting requests in
    start-tag order (FIFO within a run, weighted fair between runs) up to `max_batch_size` samples
    (a larger request runs alone), waiting at most `batch_wait_timeout_s` for more when less than a
    full batch waits. One batch runs at a time. Callers that gave up (cancelled futures) are
    dropped before their forward.
    """

    def __init__(self, run_batch: Callable[[list[Queued]], Awaitable[list]], max_batch_size: int,
                 batch_wait_timeout_s: float):
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(f"SampleBatcher: max_batch_size={max_batch_size} must be >= 1 and "
                             f"batch_wait_timeout_s={batch_wait_timeout_s} >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queues: dict[str, deque[Queued]] = {}  # waiting requests per run, FIFO
        self._finish: dict[str, float] = {}  # each run's last finish tag
        self._clock = 0.0  # virtual time: the start tag of the request last taken into a batch
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, request: Any, size: int, arrived: float, run: str = "", weight: float = 1.0) -> Any:
        """Queue `request` for `run` (fair-share `weight` > 0) and return what `run_batch` produced for it."""
        if not weight > 0:
            raise ValueError(f"SampleBatcher.submit: weight={weight!r} must be > 0")
        loop = asyncio.get_running_loop()
        if self._arrival is None:
            self._arrival = asyncio.Event()
        start = max(self._clock, self._finish.get(run, 0.0))
        self._finish[run] = start + size / weight
        item = Queued(request, size, arrived, loop.create_future(), run, start)
        self._queues.setdefault(run, deque()).append(item)
        self._arrival.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return await item.future

    def queued_samples(self) -> int:
        return sum(q.size for queue in self._queues.values() for q in queue if not q.future.done())

    def queued_requests(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def _work(self) -> None:
        assert self._arrival is not None
        while True:
            while not self.queued_requests():
                self._arrival.clear()
                await self._arrival.wait()
            await self._fill_or_timeout()
            batch = self._take()
            if batch:
                await self._run(batch)

    async def _fill_or_timeout(self) -> None:
        assert self._arrival is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_timeout_s
        while self.queued_samples() < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[Queued]:
        batch: list[Queued] = []
        total = 0
        while True:
            head = self._next()
            if head is None or (batch and total + head.size > self.max_batch_size):
                break
            self._queues[head.run].popleft()
            self._clock = max(self._clock, head.start_tag)
            batch.append(head)
            total += head.size
        return batch

    def _next(self) -> Queued | None:
        """The waiting request with the smallest start tag; drops given-up requests and empty queues."""
        best: Queued | None = None
        for run in list(self._queues):
            queue = self._queues[run]
            while queue and queue[0].future.done():  # the caller gave up: never compute it
                queue.popleft()
            if not queue:
                del self._queues[run]
            elif best is None or queue[0].start_tag < best.start_tag:
                best = queue[0]
        return best

    async def _run(self, batch: list[Queued]) -> None:
        try:
            results = await self.run_batch(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
        except Exception as e:  # noqa: BLE001 - delivered to every caller of the batch
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        for item, result in zip(batch, results):
            if not item.future.done():
                item.future.set_result(result)
