"""Per-replica teacher counters, their Ray metrics export, merging across replicas and the report.

Requests, samples requested / computed / coalesced / from cache, scores requested / computed /
reused (data selection, `teacher_service.scores`), errors by kind, batch fill,
queue-wait and forward percentiles over a bounded reservoir, and per-run throughput over a
sliding window; `kd teacher status` prints `format_stats(merge_stats(...))`.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

ERROR_KINDS = ("invalid", "too_large", "unauthenticated", "rate_limited", "in_flight_limit", "internal")
SUM_KEYS = ("requests_received", "requests", "requests_cancelled", "errors", "errors_invalid",
            "errors_too_large", "errors_unauthenticated", "errors_rate_limited", "errors_in_flight_limit",
            "errors_internal", "samples_requested", "samples_computed",
            "samples_coalesced", "samples_from_cache", "samples", "batches", "batch_requests",
            "batch_fill_sum", "forward_s", "in_flight", "samples_per_s", "coalesce_in_flight_rows",
            "coalesce_recent_rows", "reference_requests", "reference_samples", "reference_refused",
            "reference_index_builds", "reference_image_cache_hits", "reference_resolve_s",
            "scores_requested", "scores_computed", "scores_reused", "score_s", "score_memo_rows")
RUN_COUNTS = ("requests_received", "requests", "errors", "samples_requested", "samples_computed",
              "samples_coalesced", "samples_from_cache", "samples", "scores_requested", "scores_computed",
              "scores_reused")
RUN_SUM_KEYS = (*RUN_COUNTS, "samples_per_s")
MAX_RUNS = 256
RESERVOIR = 4096


class MetricsSink(Protocol):
    """Where counter updates are mirrored (Ray metrics in a replica; nothing in unit tests)."""

    def request(self, run: str, samples: int) -> None: ...
    def error(self, run: str, kind: str) -> None: ...
    def answered(self, run: str, samples: int, samples_per_s: float) -> None: ...
    def batch(self, per_run: dict[str, int], fill: float, forward_s: float, waits: list[float]) -> None: ...
    def in_flight(self, n: int) -> None: ...
    def reused(self, run: str, coalesced: int, from_cache: int) -> None: ...
    def scored(self, run: str, computed: int, reused: int) -> None: ...


@dataclass
class _Run:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RUN_COUNTS, 0))
    first_seen: float = 0.0
    window: deque = field(default_factory=deque)  # [second, samples answered] buckets
    weight: float | None = None  # fair-share weight of the run's latest accepted request


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
    and its fill (samples / max_batch_size, capped at 1). Samples answered without a forward of
    their own (`coalesce.Coalescer`) add `samples_coalesced` (joined a forward already queued or
    running) or `samples_from_cache` (the replica's table of recent rows), so
    samples_requested = samples_computed + samples_coalesced + samples_from_cache once every
    accepted request is answered. A request asking for scores adds its samples to
    `scores_requested` and to `scores_computed` (scored here, `score_s` seconds) or `scores_reused`
    (the scores of an identical request, `scores.ScoreMemo`). Queue wait (arrival →
    forward start) and forward time percentiles are over the last RESERVOIR values; per-run
    `samples_per_s` is answered samples over the last `window_s` seconds; per-run `weight` is the
    fair-share weight its latest accepted request was scheduled at (the weight gRPC callers are
    granted shows there).
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

    def accepted(self, label: str, samples: int, weight: float | None = None) -> None:
        with self._lock:
            self._c["samples_requested"] += samples
            self._c["in_flight"] += 1
            r = self._run(label)
            r.counts["samples_requested"] += samples
            if weight is not None:
                r.weight = float(weight)
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

    def reused(self, label: str, coalesced: int, from_cache: int) -> None:
        """Samples of an answered request that took no forward of their own."""
        if not (coalesced or from_cache):
            return
        with self._lock:
            self._c["samples_coalesced"] += coalesced
            self._c["samples_from_cache"] += from_cache
            counts = self._run(label).counts
            counts["samples_coalesced"] += coalesced
            counts["samples_from_cache"] += from_cache
        if self.sink:
            self.sink.reused(label, coalesced, from_cache)

    def scored(self, label: str, samples: int, reused: bool, score_s: float = 0.0) -> None:
        """A request's samples were scored (`reused`: from the scores of an identical request)."""
        kind = "scores_reused" if reused else "scores_computed"
        with self._lock:
            self._c["scores_requested"] += samples
            self._c[kind] += samples
            self._c["score_s"] += score_s
            counts = self._run(label).counts
            counts["scores_requested"] += samples
            counts[kind] += samples
        if self.sink:
            self.sink.scored(label, 0 if reused else samples, samples if reused else 0)

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
                if r.weight is not None:
                    runs[label]["weight"] = r.weight
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


def rss_bytes() -> int:
    """This process's resident memory (replicas and the gRPC ingress report it; the soak watches it)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def gpu_peak_bytes() -> int | None:
    """The most CUDA memory torch held allocated in this process so far (tensors, not the caching
    allocator's reserve), on its current device; None where this process never used CUDA. A
    replica reports it beside `rss_bytes`: what the teacher needs on a card it shares."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return int(torch.cuda.max_memory_allocated())


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
    out["rss_bytes"] = sum(s.get("rss_bytes", 0) for s in snapshots)  # the pool's resident memory
    gpu = [s["gpu_peak_bytes"] for s in snapshots if s.get("gpu_peak_bytes") is not None]
    out["gpu_peak_bytes"] = sum(gpu) if gpu else None  # the replicas' peaks added up (each on its own card)
    runs: dict[str, dict[str, float]] = {}
    for s in snapshots:
        for label, r in s.get("runs", {}).items():
            merged = runs.setdefault(label, dict.fromkeys(RUN_SUM_KEYS, 0))
            for k in RUN_SUM_KEYS:
                merged[k] += r.get(k, 0)
            if "weight" in r:  # a weight is not summed: the largest any replica scheduled the run at
                merged["weight"] = max(merged.get("weight", 0.0), r["weight"])
    out["runs"] = runs
    waits = [w for s in snapshots for w in s.get("queue_wait_samples", [])]
    forwards = [f for s in snapshots for f in s.get("forward_samples", [])]
    out.update(summarize(out, waits, forwards))
    out["replicas"] = {s.get("replica", f"#{i}"): {k: s.get(k) for k in (
        "requests", "samples", "batches", "batch_fill_mean", "in_flight", "queue_wait_p50_s", "uptime_s",
        "rss_bytes", "gpu_peak_bytes")}
        for i, s in enumerate(snapshots)}
    out["replicas_answered"] = len(snapshots)
    return out


def add_ingress(stats: dict[str, Any], ingress: dict[str, Any]) -> dict[str, Any]:
    """`stats` (one replica's or merged) plus the refusals counted at the gRPC ingress.

    The ingress counts only what it refuses (a request it forwards is counted by the replica), so
    adding its counts keeps every request counted once: requests_received, errors and errors by
    kind, per run. Its own state (address, callers in flight, memory) goes under `grpc_ingress`.
    """
    out = {**stats, "runs": {label: dict(r) for label, r in stats.get("runs", {}).items()}}
    for key in ("requests_received", "errors", *(f"errors_{kind}" for kind in ERROR_KINDS)):
        out[key] = out.get(key, 0) + ingress.get(key, 0)
    for label, r in ingress.get("runs", {}).items():
        merged = out["runs"].setdefault(label, dict.fromkeys(RUN_SUM_KEYS, 0))
        for key in ("requests_received", "errors"):
            merged[key] = merged.get(key, 0) + r.get(key, 0)
    out["grpc_ingress"] = {k: ingress.get(k) for k in ("address", "callers_in_flight", "rss_bytes", "uptime_s",
                                                        "health_serving")}
    return out


# ------------------------------------------------------------------------------------- Ray metrics
WAIT_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FILL_BOUNDS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999)
RUN_TAGS = ("app", "run")
SOURCES = ("replica", "ingress")  # the processes that export teacher metrics


@dataclass(frozen=True)
class MetricSpec:
    """One teacher metric as Ray registers it (Prometheus adds the `ray_` prefix, `_total` to a
    counter and `_bucket` / `_sum` / `_count` to a histogram), with the tags it carries and the
    processes that export it. `METRICS` is the one list: the sink builds from it, the dashboard
    test and docs/cluster.md are checked against it."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tags: tuple[str, ...]
    sources: tuple[str, ...] = ("replica",)
    boundaries: tuple[float, ...] = ()


METRICS = (
    MetricSpec("kd_teacher_requests", "counter", "requests accepted", RUN_TAGS),
    MetricSpec("kd_teacher_samples_requested", "counter", "samples in accepted requests", RUN_TAGS),
    MetricSpec("kd_teacher_samples_computed", "counter", "samples run through the teacher", RUN_TAGS),
    MetricSpec("kd_teacher_samples_answered", "counter", "samples answered", RUN_TAGS),
    MetricSpec("kd_teacher_samples_coalesced", "counter", "samples answered by a forward another request started",
               RUN_TAGS),
    MetricSpec("kd_teacher_samples_from_cache", "counter", "samples answered from the replica's recent rows",
               RUN_TAGS),
    MetricSpec("kd_teacher_scores_requested", "counter", "samples whose scores were asked (data selection)",
               RUN_TAGS),
    MetricSpec("kd_teacher_scores_computed", "counter", "samples scored by the replica", RUN_TAGS),
    MetricSpec("kd_teacher_scores_reused", "counter", "samples answered the scores of an identical request",
               RUN_TAGS),
    MetricSpec("kd_teacher_errors", "counter", "requests refused or failed", ("app", "run", "kind"),
               sources=SOURCES),
    MetricSpec("kd_teacher_batches", "counter", "teacher forward passes", ("app",)),
    MetricSpec("kd_teacher_batch_fill_ratio", "histogram", "samples per forward / max_batch_size", ("app",),
               boundaries=FILL_BOUNDS),
    MetricSpec("kd_teacher_queue_wait_s", "histogram", "request arrival to its forward start", ("app",),
               boundaries=WAIT_BOUNDS),
    MetricSpec("kd_teacher_forward_s", "histogram", "forward pass time (preprocess + encode)", ("app",),
               boundaries=WAIT_BOUNDS),
    MetricSpec("kd_teacher_run_samples_per_s", "gauge", "answered samples/s over the sliding window",
               ("app", "run", "replica")),
    MetricSpec("kd_teacher_in_flight", "gauge", "accepted requests not answered yet", ("app", "replica")),
)


def zero_series(spec: MetricSpec, app: str, replica: str, run: str) -> list[dict[str, str]]:
    """The tag sets of `spec` exported at 0 before anything is counted: every combination known
    without traffic (the app, the replica, each error kind) for `run` ('' when the app deploys:
    Prometheus reads an empty label as absent, so panels summing by run show the app's 0). None
    for a histogram: Ray 2.60 exports its buckets only from its first observation."""
    if spec.kind == "histogram":
        return []
    known = {"app": [app], "replica": [replica], "run": [run], "kind": list(ERROR_KINDS)}
    series: list[dict[str, str]] = [{}]
    for key in spec.tags:
        series = [{**tags, key: value} for tags in series for value in known[key]]
    return series


class RayMetricsSink:
    """Mirrors the counters into Ray metrics (`METRICS`, those its `source` exports).

    Every counter and gauge is exported at 0 when the sink is made (the replica or ingress
    starts) and for each run the first time it is counted, so a dashboard panel reads 0 on a
    healthy pool rather than "No data", and a series exists before its first increment (a
    Prometheus `rate()` sees an increment only from a sample before it). Gauges carry `replica`
    so replicas do not overwrite each other; run gauges keep their last value after a run stops.
    """

    def __init__(self, app_name: str, replica: str, source: str = "replica"):
        from ray.util.metrics import Counter, Gauge, Histogram

        if source not in SOURCES:
            raise ValueError(f"metrics source: expected one of {SOURCES}, got {source!r}")
        self._app_name, self._replica_name = app_name, replica
        self._app = {"app": app_name}
        self._replica = {"app": app_name, "replica": replica}
        self._metrics: dict[str, Any] = {}
        for spec in METRICS:
            if source not in spec.sources:
                continue
            if spec.kind == "histogram":
                self._metrics[spec.name] = Histogram(spec.name, spec.description, boundaries=list(spec.boundaries),
                                                     tag_keys=spec.tags)
            else:
                self._metrics[spec.name] = {"counter": Counter, "gauge": Gauge}[spec.kind](
                    spec.name, spec.description, tag_keys=spec.tags)
        self._runs: set[str] = set()
        self._export_zeros(run="")

    def request(self, run: str, samples: int) -> None:
        self._inc("kd_teacher_requests", 1, run)
        self._inc("kd_teacher_samples_requested", samples, run)

    def reused(self, run: str, coalesced: int, from_cache: int) -> None:
        self._inc("kd_teacher_samples_coalesced", coalesced, run)
        self._inc("kd_teacher_samples_from_cache", from_cache, run)

    def scored(self, run: str, computed: int, reused: int) -> None:
        self._inc("kd_teacher_scores_requested", computed + reused, run)
        self._inc("kd_teacher_scores_computed", computed, run)
        self._inc("kd_teacher_scores_reused", reused, run)

    def error(self, run: str, kind: str) -> None:
        self._inc("kd_teacher_errors", 1, run, kind=kind)

    def answered(self, run: str, samples: int, samples_per_s: float) -> None:
        self._inc("kd_teacher_samples_answered", samples, run)
        self._metrics["kd_teacher_run_samples_per_s"].set(samples_per_s, {**self._replica, "run": run})

    def batch(self, per_run: dict[str, int], fill: float, forward_s: float, waits: list[float]) -> None:
        self._metrics["kd_teacher_batches"].inc(1, self._app)
        for run, samples in per_run.items():
            self._inc("kd_teacher_samples_computed", samples, run)
        self._metrics["kd_teacher_batch_fill_ratio"].observe(fill, self._app)
        self._metrics["kd_teacher_forward_s"].observe(forward_s, self._app)
        for w in waits:
            self._metrics["kd_teacher_queue_wait_s"].observe(w, self._app)

    def in_flight(self, n: int) -> None:
        self._metrics["kd_teacher_in_flight"].set(n, self._replica)

    # ---- internals
    def _inc(self, name: str, value: int, run: str, **tags: str) -> None:
        """Add `value` (Ray refuses 0) to a per-run counter, its run's series exported at 0 first."""
        if run not in self._runs:
            self._export_zeros(run)
        if value:
            self._metrics[name].inc(value, {**self._app, "run": run, **tags})

    def _export_zeros(self, run: str) -> None:
        """Export at 0 every series `zero_series` names for `run` ('' : the app-wide ones)."""
        self._runs.add(run)
        for spec in METRICS:
            if spec.name not in self._metrics or (run and "run" not in spec.tags):
                continue
            metric = self._metrics[spec.name]
            for tags in zero_series(spec, self._app_name, self._replica_name, run):
                if spec.kind == "gauge":
                    metric.set(0, tags)
                else:  # `Counter.inc` refuses 0; `_record` is the checked call beneath it, which exports 0
                    metric._record(0, tags)


def ray_metrics_sink(app_name: str, replica: str, source: str = "replica") -> MetricsSink | None:
    """Ray metrics when running in a Ray worker (a replica, or `source="ingress"`: the gRPC
    ingress, which exports its refusals only); None (counters only) elsewhere."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return RayMetricsSink(app_name, replica, source)
    except Exception as e:  # noqa: BLE001 - metrics are an export, never a reason to fail serving
        log.warning("teacher metrics disabled: %s", e)
        return None


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
        f"unauthenticated {s.get('errors_unauthenticated', 0):.0f}, rate limited {s.get('errors_rate_limited', 0):.0f}, "
        f"in-flight limit {s.get('errors_in_flight_limit', 0):.0f}, internal {s['errors_internal']:.0f})",
        f"samples    requested {s['samples_requested']:.0f}, computed {s['samples_computed']:.0f}, coalesced "
        f"{s['samples_coalesced']:.0f}, from cache {s['samples_from_cache']:.0f}, answered {s['samples']:.0f}",
        f"scores     requested {s.get('scores_requested', 0):.0f}, computed {s.get('scores_computed', 0):.0f} "
        f"({s.get('score_s', 0):.2f} s), reused {s.get('scores_reused', 0):.0f} (data selection)",
        f"batches    {s['batches']:.0f}, fill {num(s['batch_fill_mean'])} of max_batch_size {s.get('max_batch_size')} "
        f"(largest {s['max_batch_samples']:.0f} samples), {num(s['requests_per_batch'], '.1f')} requests/batch",
        f"queue wait p50 {ms(s['queue_wait_p50_s'])}, p99 {ms(s['queue_wait_p99_s'])}, max {ms(s['queue_wait_max_s'])} "
        f"(last {s['queue_wait_count']} requests)",
        f"forward    mean {ms(s['forward_mean_s'])}, p50 {ms(s['forward_p50_s'])}, p99 {ms(s['forward_p99_s'])}, "
        f"total {s['forward_s']:.1f} s",
        f"throughput {s['samples_per_s']:.1f} samples/s over the last {s.get('window_s', 0):.0f} s",
    ]
    if s.get("grpc_ingress"):
        g = s["grpc_ingress"]
        lines.append(f"gRPC       listening on {g.get('address')}, callers in flight {g.get('callers_in_flight') or {}}")
    if s["runs"]:
        lines.append(f"{'run':<24} {'requests':>9} {'samples':>9} {'computed':>9} {'coalesced':>9} "
                     f"{'cached':>7} {'errors':>7} {'samples/s':>10}")
        for run, r in sorted(s["runs"].items()):
            lines.append(f"{run:<24} {r['requests']:>9.0f} {r['samples']:>9.0f} {r['samples_computed']:>9.0f} "
                         f"{r.get('samples_coalesced', 0):>9.0f} {r.get('samples_from_cache', 0):>7.0f} "
                         f"{r['errors']:>7.0f} {r['samples_per_s']:>10.1f}")
    if len(s.get("replicas", {})) > 1:
        lines.append(f"{'replica':<24} {'requests':>9} {'batches':>9} {'fill':>6} {'in flight':>9}")
        for rep, r in sorted(s["replicas"].items()):
            lines.append(f"{rep:<24} {r['requests']:>9.0f} {r['batches']:>9.0f} {num(r['batch_fill_mean']):>6} "
                         f"{r['in_flight']:>9.0f}")
    return "\n".join(lines)
