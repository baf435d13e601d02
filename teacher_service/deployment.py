"""The teacher as a Ray Serve deployment: a detached, named replica pool with sample-counted batching.

Serve apps outlive the job that deployed them, so one `deploy()` serves every student run that
later calls `get_teacher_handle(app_name)`. Requests are validated before they join a batch (a bad
request fails alone); the batch itself is `TeacherEngine.embed_many`, run in a single worker thread.

Batching is `SampleBatcher`, not `@serve.batch`: Serve's batch loop (ray 2.60 `_process_batches`)
seals the next batch `batch_wait_timeout_s` after its first request even while the previous
forward still runs (the batch then waits on the max_concurrent_batches semaphore), so requests
arriving during a forward are split into many small batches. `SampleBatcher` forms the next batch
only once the forward is free, so everything that arrived meanwhile shares it. Measured on Serve
with a ~100 ms CPU forward, 2 callers x 20 requests of 8 samples, max_batch_size 64: with 2 in
flight per caller 14 → 10 forwards (fill 0.36 → 0.50), with 4 in flight 12 → 9 (0.42 → 0.56).

Every replica keeps `TeacherCounters` (requests, samples requested / computed, errors, batch fill,
queue wait and forward percentiles, per-run throughput), returned by `stats()` and exported as Ray
metrics; `collect_stats` merges them over all replicas (Serve's handle broadcast). The gRPC
methods `Embed`, `Stats`, `Health` (called by Serve's gRPC proxy, see `grpc_ingress`) decode the
proto and go through exactly the same path as `embed`.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from .config import TeacherConfig
from .engine import TeacherEngine
from .grpc_ingress import (DEFAULT_MAX_REQUEST_BYTES, RequestTooLargeError, WireLimits, decode_embed_request,
                           encode_embed_reply, encode_health_reply, encode_stats_reply, refuse)
from .model import load_teacher
from .proto import teacher_pb2 as pb
from .protocol import EmbedRequest, EmbedResponse, RequestError, RequestLimits

log = logging.getLogger(__name__)


class TeacherUnavailableError(RuntimeError):
    """No running teacher app of the requested name."""


# ========================================================================================= batching
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


# ========================================================================================= counters
ERROR_KINDS = ("invalid", "too_large", "internal")
SUM_KEYS = ("requests_received", "requests", "requests_cancelled", "errors", "errors_invalid",
            "errors_too_large", "errors_internal", "samples_requested", "samples_computed",
            "samples_coalesced", "samples_from_cache", "samples", "batches", "batch_requests",
            "batch_fill_sum", "forward_s", "in_flight", "samples_per_s")
RUN_SUM_KEYS = ("requests_received", "requests", "errors", "samples_requested", "samples_computed", "samples",
                "samples_per_s")
MAX_RUNS = 256
RESERVOIR = 4096


class MetricsSink(Protocol):
    """Where counter updates are mirrored (Ray metrics in a replica; nothing in unit tests)."""

    def request(self, run: str, samples: int) -> None: ...
    def error(self, run: str, kind: str) -> None: ...
    def answered(self, run: str, samples: int, samples_per_s: float) -> None: ...
    def batch(self, per_run: dict[str, int], fill: float, forward_s: float, waits: list[float]) -> None: ...
    def in_flight(self, n: int) -> None: ...


@dataclass
class _Run:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("requests_received", "requests", "errors", "samples_requested", "samples_computed", "samples"), 0))
    first_seen: float = 0.0
    window: deque = field(default_factory=deque)  # [second, samples answered] buckets


def run_label(run: Any) -> str:
    """Bounded, printable name for accounting: '' → 'anonymous', non-str → 'invalid'."""
    if not isinstance(run, str):
        return "invalid"
    return run[:64] if run else "anonymous"


class TeacherCounters:
    """One replica's counters, safe to update from the event loop and the forward thread.

    A request is `requests_received` on arrival; then refused (`errors_invalid` / `errors_too_large`),
    or accepted (`samples_requested`), and finally answered (`requests`, `samples`), failed
    (`errors_internal`) or cancelled by its caller. Each forward adds `batches`, `samples_computed`
    and its fill (samples / max_batch_size, capped at 1). `samples_coalesced` and
    `samples_from_cache` stay 0 until request coalescing and the cache exist. Queue wait (arrival →
    forward start) and forward time percentiles are over the last RESERVOIR values; per-run
    `samples_per_s` is answered samples over the last `window_s` seconds.
    """

    def __init__(self, max_batch_size: int, app_name: str = "", replica: str = "local", window_s: float = 60.0,
                 reservoir: int = RESERVOIR, clock: Callable[[], float] = time.monotonic,
                 sink: MetricsSink | None = None):
        self.max_batch_size = max_batch_size
        self.app_name = app_name
        self.replica = replica
        self.window_s = window_s
        self.clock = clock
        self.sink = sink
        self._lock = threading.Lock()
        self._c: dict[str, float] = dict.fromkeys(SUM_KEYS, 0)
        self._c["max_batch_samples"] = 0
        self._runs: dict[str, _Run] = {}
        self._waits: deque[float] = deque(maxlen=reservoir)
        self._forwards: deque[float] = deque(maxlen=reservoir)

    # ---- request lifecycle
    def received(self, run: Any) -> str:
        """Count an arrival; returns the run label to pass to the later calls."""
        with self._lock:
            label = self._admit(run_label(run))
            self._c["requests_received"] += 1
            self._runs[label].counts["requests_received"] += 1
        return label

    def refused(self, label: str, kind: str) -> None:
        self._error(label, kind, in_flight=False)

    def accepted(self, label: str, samples: int) -> None:
        with self._lock:
            self._c["samples_requested"] += samples
            self._c["in_flight"] += 1
            self._run(label).counts["samples_requested"] += samples
            n = self._c["in_flight"]
        if self.sink:
            self.sink.request(label, samples)
            self.sink.in_flight(int(n))

    def answered(self, label: str, samples: int) -> None:
        now = self.clock()
        with self._lock:
            self._c["requests"] += 1
            self._c["samples"] += samples
            self._c["in_flight"] -= 1
            r = self._run(label)
            r.counts["requests"] += 1
            r.counts["samples"] += samples
            second = math.floor(now)
            if r.window and r.window[-1][0] == second:
                r.window[-1][1] += samples
            else:
                r.window.append([second, samples])
            rate = self._rate(r, now)
            n = self._c["in_flight"]
        if self.sink:
            self.sink.answered(label, samples, rate)
            self.sink.in_flight(int(n))

    def failed(self, label: str) -> None:
        self._error(label, "internal", in_flight=True)

    def cancelled(self, label: str) -> None:
        with self._lock:
            self._c["requests_cancelled"] += 1
            self._c["in_flight"] -= 1
            n = self._c["in_flight"]
        if self.sink:
            self.sink.in_flight(int(n))

    def batch_done(self, items: list[tuple[str, int, float]], computed: list[bool], started: float,
                   ended: float) -> None:
        """One forward: `items` are (run label, samples, arrival time), `computed[i]` if item i was answered."""
        per_run: dict[str, int] = {}
        for (label, samples, _), ok in zip(items, computed):
            if ok:
                per_run[label] = per_run.get(label, 0) + samples
        n = sum(per_run.values())
        fill = min(1.0, n / self.max_batch_size)
        waits = [max(0.0, started - arrived) for _, _, arrived in items]
        forward_s = ended - started
        with self._lock:
            c = self._c
            c["batches"] += 1
            c["batch_requests"] += sum(computed)
            c["samples_computed"] += n
            c["batch_fill_sum"] += fill
            c["forward_s"] += forward_s
            c["max_batch_samples"] = max(c["max_batch_samples"], n)
            for label, samples in per_run.items():
                self._run(label).counts["samples_computed"] += samples
            self._waits.extend(waits)
            self._forwards.append(forward_s)
        if self.sink:
            self.sink.batch(per_run, fill, forward_s, waits)

    # ---- reading
    def snapshot(self, include_samples: bool = False) -> dict[str, Any]:
        """Counters plus derived ratios and percentiles; `include_samples` adds the raw reservoirs
        (queue_wait_samples, forward_samples) so `merge_stats` can compute exact merged percentiles."""
        now = self.clock()
        with self._lock:
            out: dict[str, Any] = {**self._c, "replica": self.replica, "app_name": self.app_name,
                                   "max_batch_size": self.max_batch_size, "window_s": self.window_s}
            runs = {}
            for label, r in self._runs.items():
                runs[label] = {**r.counts, "samples_per_s": self._rate(r, now)}
            waits, forwards = list(self._waits), list(self._forwards)
        out["runs"] = runs
        out["samples_per_s"] = sum(r["samples_per_s"] for r in runs.values())
        out.update(summarize(out, waits, forwards))
        if include_samples:
            out["queue_wait_samples"], out["forward_samples"] = waits, forwards
        return out

    # ---- internals (called with the lock held unless noted)
    def _admit(self, label: str) -> str:
        """The label a new request is accounted under: its run, or 'other' past MAX_RUNS runs
        (bounds memory and metric tag cardinality)."""
        if label not in self._runs and len(self._runs) >= MAX_RUNS:
            label = "other"
        if label not in self._runs:
            self._runs[label] = _Run(first_seen=self.clock())
        return label

    def _run(self, label: str) -> _Run:
        return self._runs[label] if label in self._runs else self._runs[self._admit(label)]

    def _rate(self, r: _Run, now: float) -> float:
        horizon = math.floor(now - self.window_s)
        while r.window and r.window[0][0] <= horizon:
            r.window.popleft()
        span = min(self.window_s, max(now - r.first_seen, 1.0))
        return sum(s for _, s in r.window) / span

    def _error(self, label: str, kind: str, in_flight: bool) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind: expected one of {ERROR_KINDS}, got {kind!r}")
        with self._lock:
            self._c["errors"] += 1
            self._c[f"errors_{kind}"] += 1
            self._run(label).counts["errors"] += 1
            if in_flight:
                self._c["in_flight"] -= 1
            n = self._c["in_flight"]
        if self.sink:
            self.sink.error(label, kind)
            if in_flight:
                self.sink.in_flight(int(n))


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(c: dict[str, Any], waits: list[float], forwards: list[float]) -> dict[str, Any]:
    """Derived entries from summed counters and raw reservoirs (shared by snapshot and merge)."""
    batches = c["batches"]
    return {
        "batch_fill_mean": c["batch_fill_sum"] / batches if batches else None,
        "requests_per_batch": c["batch_requests"] / batches if batches else None,
        "forward_mean_s": c["forward_s"] / batches if batches else None,
        "forward_p50_s": percentile(forwards, 50), "forward_p99_s": percentile(forwards, 99),
        "queue_wait_p50_s": percentile(waits, 50), "queue_wait_p99_s": percentile(waits, 99),
        "queue_wait_max_s": max(waits) if waits else None, "queue_wait_count": len(waits),
    }


def merge_stats(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum replica snapshots (taken with include_samples=True for exact percentiles) into one.

    The result has the shape of one snapshot, plus `replicas` ({replica: short summary}) and
    `replicas_answered`; percentiles are recomputed from the pooled reservoirs.
    """
    if not snapshots:
        raise ValueError("merge_stats: no replica snapshots to merge")
    out: dict[str, Any] = {k: sum(s.get(k, 0) for s in snapshots) for k in SUM_KEYS}
    out["max_batch_samples"] = max(s.get("max_batch_samples", 0) for s in snapshots)
    first = snapshots[0]
    for key in ("app_name", "max_batch_size", "window_s", "fingerprint", "model"):
        if key in first:
            out[key] = first[key]
    out["uptime_s"] = max(s.get("uptime_s", 0.0) for s in snapshots)
    runs: dict[str, dict[str, float]] = {}
    for s in snapshots:
        for label, r in s.get("runs", {}).items():
            merged = runs.setdefault(label, dict.fromkeys(RUN_SUM_KEYS, 0))
            for k in RUN_SUM_KEYS:
                merged[k] += r.get(k, 0)
    out["runs"] = runs
    waits = [w for s in snapshots for w in s.get("queue_wait_samples", [])]
    forwards = [f for s in snapshots for f in s.get("forward_samples", [])]
    out.update(summarize(out, waits, forwards))
    out["replicas"] = {s.get("replica", f"#{i}"): {k: s.get(k) for k in (
        "requests", "samples", "batches", "batch_fill_mean", "in_flight", "queue_wait_p50_s", "uptime_s")}
        for i, s in enumerate(snapshots)}
    out["replicas_answered"] = len(snapshots)
    return out


class RayMetricsSink:
    """Mirrors the counters into Ray metrics (Prometheus names get Ray's `ray_` prefix).

    Tags: `app` and `run` where the value is per run; gauges also carry `replica` so replicas do
    not overwrite each other. Run gauges keep their last value after a run stops sending.
    """

    WAIT_BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    FILL_BOUNDS = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999]

    def __init__(self, app_name: str, replica: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self._app = {"app": app_name}
        self._replica = {"app": app_name, "replica": replica}
        run_tags = ("app", "run")
        self.requests = Counter("kd_teacher_requests", "requests accepted", tag_keys=run_tags)
        self.samples_requested = Counter("kd_teacher_samples_requested", "samples in accepted requests",
                                         tag_keys=run_tags)
        self.samples_computed = Counter("kd_teacher_samples_computed", "samples run through the teacher",
                                        tag_keys=run_tags)
        self.samples_answered = Counter("kd_teacher_samples_answered", "samples answered", tag_keys=run_tags)
        self.errors = Counter("kd_teacher_errors", "requests refused or failed", tag_keys=("app", "run", "kind"))
        self.batches = Counter("kd_teacher_batches", "teacher forward passes", tag_keys=("app",))
        self.fill = Histogram("kd_teacher_batch_fill_ratio", "samples per forward / max_batch_size",
                              boundaries=self.FILL_BOUNDS, tag_keys=("app",))
        self.wait = Histogram("kd_teacher_queue_wait_s", "request arrival to its forward start",
                              boundaries=self.WAIT_BOUNDS, tag_keys=("app",))
        self.forward = Histogram("kd_teacher_forward_s", "forward pass time (preprocess + encode)",
                                 boundaries=self.WAIT_BOUNDS, tag_keys=("app",))
        self.rate = Gauge("kd_teacher_run_samples_per_s", "answered samples/s over the sliding window",
                          tag_keys=("app", "run", "replica"))
        self.pending = Gauge("kd_teacher_in_flight", "accepted requests not answered yet",
                             tag_keys=("app", "replica"))

    def request(self, run: str, samples: int) -> None:
        tags = {**self._app, "run": run}
        self.requests.inc(1, tags)
        if samples:
            self.samples_requested.inc(samples, tags)

    def error(self, run: str, kind: str) -> None:
        self.errors.inc(1, {**self._app, "run": run, "kind": kind})

    def answered(self, run: str, samples: int, samples_per_s: float) -> None:
        if samples:
            self.samples_answered.inc(samples, {**self._app, "run": run})
        self.rate.set(samples_per_s, {**self._replica, "run": run})

    def batch(self, per_run: dict[str, int], fill: float, forward_s: float, waits: list[float]) -> None:
        self.batches.inc(1, self._app)
        for run, samples in per_run.items():
            if samples:
                self.samples_computed.inc(samples, {**self._app, "run": run})
        self.fill.observe(fill, self._app)
        self.forward.observe(forward_s, self._app)
        for w in waits:
            self.wait.observe(w, self._app)

    def in_flight(self, n: int) -> None:
        self.pending.set(n, self._replica)


# ======================================================================================= deployment
@serve.deployment
class TeacherDeployment:
    """One replica: a frozen teacher, its engine, a SampleBatcher and the replica's counters."""

    def __init__(self, config: dict, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.cfg = TeacherConfig.from_dict(config)
        self.teacher = load_teacher(self.cfg)
        self.engine = TeacherEngine(self.teacher, RequestLimits(max_samples=self.cfg.max_request_samples))
        self.wire_limits = WireLimits(max_request_bytes=max_request_bytes)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-forward")
        self._clock = time.monotonic
        self._started = time.time()
        self.replica = _replica_id()
        self.counters = TeacherCounters(self.cfg.max_batch_size, self.cfg.app_name, self.replica,
                                        clock=self._clock, sink=_ray_sink(self.cfg.app_name, self.replica))
        self.batcher = SampleBatcher(self._run_batch, self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s)

    # ---- the handle API
    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """Embed one mini-batch; a RequestError goes to this caller only."""
        return await self._embed(request, self._clock())

    async def info(self) -> dict[str, Any]:
        """Teacher identity (fingerprint, sizes, scales) and the limits clients must respect."""
        return {**self.teacher.info(), "app_name": self.cfg.app_name,
                "max_batch_size": self.cfg.max_batch_size,
                "max_request_samples": self.cfg.max_request_samples,
                "max_request_bytes": self.wire_limits.max_request_bytes,
                "replica": self.replica, "uptime_s": time.time() - self._started}

    async def stats(self, include_samples: bool = False) -> dict[str, Any]:
        """This replica's counters (`TeacherCounters.snapshot`); `collect_stats` merges all replicas."""
        return {**self.counters.snapshot(include_samples), "fingerprint": self.teacher.fingerprint,
                "model": self.cfg.model, "uptime_s": time.time() - self._started}

    # ---- the gRPC API (Serve's proxy calls the method named like the rpc)
    async def Embed(self, request: pb.EmbedRequest, grpc_context: Any = None) -> pb.EmbedReply:
        """rpc Embed: decode, the same path as `embed`, encode; refusals set the gRPC status."""
        arrived = self._clock()
        try:
            decoded = decode_embed_request(request, self.wire_limits)
        except RequestError as e:
            label = self.counters.received(getattr(request, "run", None))
            self.counters.refused(label, "too_large" if isinstance(e, RequestTooLargeError) else "invalid")
            return refuse(grpc_context, e, pb.EmbedReply())
        try:
            response = await self._embed(decoded, arrived)
        except RequestError as e:
            return refuse(grpc_context, e, pb.EmbedReply())
        return encode_embed_reply(response)

    async def Stats(self, request: pb.StatsRequest, grpc_context: Any = None) -> pb.StatsReply:
        """rpc Stats: this replica's counters, or all replicas' merged when `all_replicas`."""
        if request.all_replicas:
            ctx = serve.get_replica_context()
            handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
            snapshots = await handle.broadcast("stats", include_samples=True).results_async(timeout_s=30)
            return encode_stats_reply(merge_stats(snapshots))
        return encode_stats_reply(await self.stats())

    async def Health(self, request: pb.HealthRequest, grpc_context: Any = None) -> pb.HealthReply:
        """rpc Health: answered by any replica that runs; carries identity and limits."""
        return encode_health_reply(await self.info())

    # ---- internals
    async def _embed(self, request: EmbedRequest, arrived: float) -> EmbedResponse:
        label = self.counters.received(getattr(request, "run", None))
        try:
            self.engine.validate(request)
        except RequestError:
            self.counters.refused(label, "invalid")
            raise
        size = len(request)
        self.counters.accepted(label, size)
        try:
            result = await self.batcher.submit((label, request), size, arrived)  # payload: (run label, request)
        except asyncio.CancelledError:
            self.counters.cancelled(label)
            raise
        except Exception:
            self.counters.failed(label)
            raise
        if isinstance(result, Exception):
            self.counters.failed(label)
            raise result
        self.counters.answered(label, size)
        return result

    async def _run_batch(self, batch: list[Queued]) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._forward, batch)

    def _forward(self, batch: list[Queued]) -> list:
        """Runs in the forward thread: one engine call for the whole batch, timed for the counters."""
        started = self._clock()
        results = self.engine.embed_many([q.request[1] for q in batch])
        ended = self._clock()
        self.counters.batch_done([(q.request[0], q.size, q.arrived) for q in batch],
                                 [isinstance(r, EmbedResponse) for r in results], started, ended)
        return results


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (direct construction in tests)
        return "local"


def _ray_sink(app_name: str, replica: str) -> MetricsSink | None:
    """Ray metrics when running in a Ray worker; None (counters only) elsewhere."""
    if not ray.is_initialized():
        return None
    try:
        return RayMetricsSink(app_name, replica)
    except Exception as e:  # noqa: BLE001 - metrics are an export, never a reason to fail serving
        log.warning("teacher metrics disabled: %s", e)
        return None


# ============================================================================================ apps
def build_app(cfg: TeacherConfig, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    """The Serve application for `cfg` (not yet running); `max_request_bytes` bounds gRPC requests."""
    WireLimits(max_request_bytes=max_request_bytes)  # fail here, not in the replica
    return TeacherDeployment.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg.to_dict(), max_request_bytes)


def deploy(cfg: TeacherConfig, *, grpc: bool = False,
           max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> DeploymentHandle:
    """Start (or update) the detached, named teacher app and return its handle once it runs.

    `grpc=True` gives the app the route prefix /<app_name>: Serve's proxies only route to apps
    that have one (with None, gRPC calls get NOT_FOUND). The HTTP proxy then routes there too,
    where the deployment has no HTTP handler. Start Serve with the gRPC service before the first
    deploy (`grpc_ingress.start_serve`): this call starts Serve without it when none runs yet.
    """
    return serve.run(build_app(cfg, max_request_bytes=max_request_bytes), name=cfg.app_name,
                     route_prefix=f"/{cfg.app_name}" if grpc else None, blocking=False)


def get_teacher_handle(app_name: str = "kd-teacher", timeout_s: float = 60.0) -> DeploymentHandle:
    """Handle to a running teacher app, waiting up to `timeout_s` while it deploys.

    Raises TeacherUnavailableError naming the apps that do run when `app_name` never shows up.
    """
    if not ray.is_initialized():
        raise TeacherUnavailableError("Ray is not initialised: connect with ray.init(address=...) first")
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        app = apps.get(app_name)
        status = str(getattr(app, "status", ""))
        if app is not None and status.endswith("RUNNING"):
            return serve.get_app_handle(app_name)
        if app is not None and status.endswith("DEPLOY_FAILED"):
            raise TeacherUnavailableError(f"teacher app {app_name!r} failed to deploy: {app.message}")
        if time.monotonic() >= deadline:
            running = {name: str(a.status) for name, a in apps.items()}
            raise TeacherUnavailableError(
                f"no running teacher app {app_name!r} after {timeout_s:.0f}s "
                f"(state: {status or 'absent'}); apps on this cluster: {running or 'none'}. "
                f"Deploy it with teacher_service.deployment.deploy(cfg) or `serve deploy`."
            )
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def collect_stats(handle: DeploymentHandle, timeout_s: float = 30.0) -> dict[str, Any]:
    """Every replica's counters (Serve handle broadcast), merged by `merge_stats`.

    Replicas that fail to answer are counted in `replicas_failed` rather than failing the call.
    """
    answers = handle.broadcast("stats", include_samples=True).results(timeout_s=timeout_s, return_exceptions=True)
    snapshots = [a for a in answers if isinstance(a, dict)]
    if not snapshots:
        raise TeacherUnavailableError(f"no teacher replica answered stats: {answers}")
    merged = merge_stats(snapshots)
    merged["replicas_failed"] = len(answers) - len(snapshots)
    return merged


def format_stats(info: dict[str, Any], stats: dict[str, Any]) -> str:
    """Human-readable `kd teacher status` report of `collect_stats` output."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.1f} ms"

    def num(v: float | None, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v, fmt)

    s = stats
    lines = [
        f"teacher app {info.get('app_name')!r}: {info.get('model')} (embed_dim {info.get('embed_dim')}, "
        f"{info.get('precision')}, {info.get('device')}), fingerprint {info.get('fingerprint')}",
        f"replicas   {s['replicas_answered']} answered" + (f", {s['replicas_failed']} failed" if s.get("replicas_failed")
                                                          else "") + f", up {s.get('uptime_s', 0):.0f} s",
        f"requests   {s['requests_received']:.0f} received, {s['requests']:.0f} answered, {s['in_flight']:.0f} in flight, "
        f"{s['requests_cancelled']:.0f} cancelled",
        f"errors     {s['errors']:.0f} (invalid {s['errors_invalid']:.0f}, too large {s['errors_too_large']:.0f}, "
        f"internal {s['errors_internal']:.0f})",
        f"samples    requested {s['samples_requested']:.0f}, computed {s['samples_computed']:.0f}, coalesced "
        f"{s['samples_coalesced']:.0f}, from cache {s['samples_from_cache']:.0f}, answered {s['samples']:.0f}",
        f"batches    {s['batches']:.0f}, fill {num(s['batch_fill_mean'])} of max_batch_size {s.get('max_batch_size')} "
        f"(largest {s['max_batch_samples']:.0f} samples), {num(s['requests_per_batch'], '.1f')} requests/batch",
        f"queue wait p50 {ms(s['queue_wait_p50_s'])}, p99 {ms(s['queue_wait_p99_s'])}, max {ms(s['queue_wait_max_s'])} "
        f"(last {s['queue_wait_count']} requests)",
        f"forward    mean {ms(s['forward_mean_s'])}, p50 {ms(s['forward_p50_s'])}, p99 {ms(s['forward_p99_s'])}, "
        f"total {s['forward_s']:.1f} s",
        f"throughput {s['samples_per_s']:.1f} samples/s over the last {s.get('window_s', 0):.0f} s",
    ]
    if s["runs"]:
        lines.append(f"{'run':<24} {'requests':>9} {'samples':>9} {'computed':>9} {'errors':>7} {'samples/s':>10}")
        for run, r in sorted(s["runs"].items()):
            lines.append(f"{run:<24} {r['requests']:>9.0f} {r['samples']:>9.0f} {r['samples_computed']:>9.0f} "
                         f"{r['errors']:>7.0f} {r['samples_per_s']:>10.1f}")
    if len(s.get("replicas", {})) > 1:
        lines.append(f"{'replica':<24} {'requests':>9} {'batches':>9} {'fill':>6} {'in flight':>9}")
        for rep, r in sorted(s["replicas"].items()):
            lines.append(f"{rep:<24} {r['requests']:>9.0f} {r['batches']:>9.0f} {num(r['batch_fill_mean']):>6} "
                         f"{r['in_flight']:>9.0f}")
    return "\n".join(lines)


def app_builder(args: dict):
    """Serve config entry point (import_path teacher_service.deployment:app_builder); args = TeacherConfig fields."""
    return build_app(TeacherConfig.from_dict(dict(args or {})))
