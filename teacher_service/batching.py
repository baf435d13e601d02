"""Dynamic batching sized in samples that forms a batch only when the forward is free.

Serve's `@serve.batch` (ray 2.60 `_process_batches`) seals the next batch `batch_wait_timeout_s`
after its first request even while the previous forward still runs, so requests arriving during
a forward are split into many small batches. `SampleBatcher` gathers while the forward is busy.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

@dataclass
class Queued:
    """One request waiting for (or in) a forward: its size in samples and arrival time."""

    request: Any
    size: int
    arrived: float
    future: asyncio.Future


class SampleBatcher:
    """Dynamic batching sized in samples that forms a batch only when the forward is free.

    While a forward runs, arrivals queue; when it ends, the next batch takes the queue in FIFO order
    up to `max_batch_size` samples (a larger request runs alone), waiting at most
    `batch_wait_timeout_s` for more when the queue holds less than a full batch. One batch runs at a
    time. Callers that gave up (cancelled futures) are dropped before their forward.
    """

    def __init__(self, run_batch: Callable[[list[Queued]], Awaitable[list]], max_batch_size: int,
                 batch_wait_timeout_s: float):
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(f"SampleBatcher: max_batch_size={max_batch_size} must be >= 1 and "
                             f"batch_wait_timeout_s={batch_wait_timeout_s} >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queue: deque[Queued] = deque()
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, request: Any, size: int, arrived: float) -> Any:
        """Queue `request` and return what `run_batch` produced for it."""
        loop = asyncio.get_running_loop()
        if self._arrival is None:
            self._arrival = asyncio.Event()
        item = Queued(request, size, arrived, loop.create_future())
        self._queue.append(item)
        self._arrival.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return await item.future

    def queued_samples(self) -> int:
        return sum(q.size for q in self._queue if not q.future.done())

    async def _work(self) -> None:
        assert self._arrival is not None
        while True:
            while not self._queue:
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
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # the caller gave up: never compute it
                self._queue.popleft()
                continue
            if batch and total + item.size > self.max_batch_size:
                break
            batch.append(self._queue.popleft())
            total += item.size
        return batch

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
