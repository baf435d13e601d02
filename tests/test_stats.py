"""Teacher counters: exact values after known request sequences, batching that coalesces while the
forward runs, merging over replicas, and `kd teacher status` against a 2-replica Serve app."""
from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

from teacher_service import EmbedRequest, RequestError, TeacherConfig, TeacherEngine, load_teacher
from teacher_service.serve.batching import SampleBatcher
from teacher_service.serve.deployment import TeacherDeployment
from teacher_service.stats import MAX_RUNS, TeacherCounters, gpu_peak_bytes, merge_stats, percentile

TINY = {"model": "ViT-B-32", "pretrained": None, "precision": "fp32", "device": "cpu", "seed": 0,
        "torch_threads": 1,
        "overrides": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class RecordingSink:
    def __init__(self):
        self.calls: list[tuple] = []

    def request(self, run, samples):
        self.calls.append(("request", run, samples))

    def error(self, run, kind):
        self.calls.append(("error", run, kind))

    def answered(self, run, samples, rate):
        self.calls.append(("answered", run, samples, rate))

    def batch(self, per_run, fill, forward_s, waits):
        self.calls.append(("batch", per_run, fill, forward_s, waits))

    def in_flight(self, n):
        self.calls.append(("in_flight", n))


def request(n: int, seed: int, run: str = "") -> EmbedRequest:
    rng = np.random.default_rng(seed)
    tok = np.zeros((n, 8), np.int64)
    tok[:, 0], tok[:, 1:3], tok[:, 3] = 49406, rng.integers(1, 49000, (n, 2)), 49407
    return EmbedRequest(keys=[f"{seed}-{i}" for i in range(n)],
                        images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), tokens=tok, run=run)


def known_sequence(clock: Clock, sink=None) -> TeacherCounters:
    """Two forwards (10 then 6 samples of max 16), one refusal, one failure, one cancellation."""
    c = TeacherCounters(16, app_name="app", replica="r1", window_s=60.0, clock=clock, sink=sink)
    arrivals = [("a", 4, 0.0), ("a", 4, 0.1), ("b", 2, 0.2)]
    labels = []
    for run, n, t in arrivals:
        clock.t = t
        labels.append(c.received(run))
        c.accepted(labels[-1], n)
    c.refused(c.received(""), "invalid")
    c.batch_done([(lab, n, t) for lab, (_, n, t) in zip(labels, arrivals)], [True] * 3, started=0.5, ended=0.7)
    clock.t = 1.0
    for lab, (_, n, _) in zip(labels, arrivals):
        c.answered(lab, n)
    a = c.received("a")
    c.accepted(a, 6)
    c.batch_done([(a, 6, 1.0)], [True], started=1.2, ended=1.3)
    clock.t = 1.5
    c.answered(a, 6)
    b = c.received("b")
    c.accepted(b, 3)
    c.cancelled(b)
    a = c.received("a")
    c.accepted(a, 1)
    c.failed(a)
    clock.t = 2.0
    return c


def test_counters_after_known_sequence():
    clock = Clock()
    s = known_sequence(clock).snapshot()
    expected = {"requests_received": 7, "requests": 4, "requests_cancelled": 1, "errors": 2, "errors_invalid": 1,
                "errors_too_large": 0, "errors_internal": 1, "samples_requested": 20, "samples_computed": 16,
                "samples_coalesced": 0, "samples_from_cache": 0, "samples": 16, "batches": 2, "in_flight": 0,
                "max_batch_samples": 10, "queue_wait_count": 4, "replica": "r1", "app_name": "app"}
    assert {k: s[k] for k in expected} == expected
    assert s["batch_fill_mean"] == pytest.approx((10 / 16 + 6 / 16) / 2)
    assert s["requests_per_batch"] == 2.0
    # waits: 0.5, 0.4, 0.3 (first forward at 0.5), 0.2 (second at 1.2) → nearest-rank p50 0.3, p99 0.5
    assert s["queue_wait_p50_s"] == pytest.approx(0.3) and s["queue_wait_p99_s"] == pytest.approx(0.5)
    assert s["queue_wait_max_s"] == pytest.approx(0.5)
    assert s["forward_s"] == pytest.approx(0.3) and s["forward_mean_s"] == pytest.approx(0.15)
    assert s["forward_p50_s"] == pytest.approx(0.1) and s["forward_p99_s"] == pytest.approx(0.2)
    a, b, anon = s["runs"]["a"], s["runs"]["b"], s["runs"]["anonymous"]
    assert (a["requests_received"], a["requests"], a["samples_requested"], a["samples_computed"], a["samples"],
            a["errors"]) == (4, 3, 15, 14, 14, 1)
    assert (b["requests_received"], b["requests"], b["samples"], b["samples_computed"]) == (2, 1, 2, 2)
    assert (anon["requests_received"], anon["errors"], anon["samples_requested"]) == (1, 1, 0)
    # per-run throughput: answered samples over min(window, time since the run was first seen)
    assert a["samples_per_s"] == pytest.approx(14 / 2.0) and b["samples_per_s"] == pytest.approx(2 / 1.8)
    assert s["samples_per_s"] == pytest.approx(14 / 2.0 + 2 / 1.8)
    assert "queue_wait_samples" not in s


def test_sliding_window_forgets_old_samples():
    clock = Clock()
    c = known_sequence(clock)
    clock.t = 200.0
    s = c.snapshot()
    assert s["runs"]["a"]["samples_per_s"] == 0 and s["samples_per_s"] == 0 and s["samples"] == 16
    lab = c.received("a")
    c.accepted(lab, 5)
    c.answered(lab, 5)
    assert c.snapshot()["runs"]["a"]["samples_per_s"] == pytest.approx(5 / 60)  # window_s caps the span


def test_sink_mirrors_the_counters():
    sink = RecordingSink()
    known_sequence(Clock(), sink)
    batches = [call for call in sink.calls if call[0] == "batch"]
    assert [b[1] for b in batches] == [{"a": 8, "b": 2}, {"a": 6}]
    assert batches[0][2] == pytest.approx(10 / 16) and batches[0][3] == pytest.approx(0.2)
    assert batches[0][4] == pytest.approx([0.5, 0.4, 0.3])
    assert [c for c in sink.calls if c[0] == "error"] == [("error", "anonymous", "invalid"), ("error", "a", "internal")]
    assert sum(c[2] for c in sink.calls if c[0] == "request") == 20
    assert sum(c[2] for c in sink.calls if c[0] == "answered") == 16
    assert [c for c in sink.calls if c[0] == "in_flight"][-1] == ("in_flight", 0)


class RayMetricStandIns:
    """Stand-ins for ray.util.metrics' Counter, Gauge and Histogram that keep what a sink exports:
    (name, tags) → value for counters and gauges, → observations for histograms. Tags are checked
    as Ray checks them (every tag key, string values), and `Counter.inc` refuses 0 as Ray's does."""

    def __init__(self, monkeypatch):
        import ray.util.metrics

        self.kinds: dict[str, str] = {}
        self.series: dict[tuple[str, frozenset], float | list[float]] = {}
        for kind in ("counter", "gauge", "histogram"):
            monkeypatch.setattr(ray.util.metrics, kind.capitalize(), self._metric_class(kind))

    def value(self, name: str, **tags: str):
        return self.series[(name, frozenset(tags.items()))]

    def named(self, name: str) -> dict[frozenset, float | list[float]]:
        return {tags: v for (n, tags), v in self.series.items() if n == name}

    def _metric_class(self, kind: str):
        stand_ins = self

        class Metric:
            def __init__(self, name, description="", boundaries=None, tag_keys=()):
                assert isinstance(tag_keys, tuple) and (boundaries is not None) == (kind == "histogram")
                self.name, self.tag_keys = name, tag_keys
                stand_ins.kinds[name] = kind

            def _key(self, tags):
                assert set(tags) == set(self.tag_keys) and all(isinstance(v, str) for v in tags.values()), tags
                return self.name, frozenset(tags.items())

            def _record(self, value, tags):
                key = self._key(tags)
                if kind == "histogram":
                    stand_ins.series.setdefault(key, []).append(value)
                elif kind == "gauge":
                    stand_ins.series[key] = value
                else:
                    stand_ins.series[key] = stand_ins.series.get(key, 0) + value

            def inc(self, value=1.0, tags=None):
                if value <= 0:
                    raise ValueError(f"value must be >0, got {value}")
                self._record(value, tags)

            set = observe = _record

        return Metric


def test_ray_sink_exports_every_counter_and_gauge_at_zero_before_anything_is_counted(monkeypatch):
    from teacher_service.stats import ERROR_KINDS, METRICS, RayMetricsSink

    ray_metrics = RayMetricStandIns(monkeypatch)
    RayMetricsSink("app", "r1")
    assert ray_metrics.kinds == {spec.name: spec.kind for spec in METRICS}  # the declaration is what registers
    run_counters = ("requests", "samples_requested", "samples_computed", "samples_answered", "samples_coalesced",
                    "samples_from_cache", "scores_requested", "scores_computed", "scores_reused")
    expected = {**{(f"kd_teacher_{c}", frozenset({("app", "app"), ("run", "")})): 0 for c in run_counters},
                **{("kd_teacher_errors", frozenset({("app", "app"), ("run", ""), ("kind", k)})): 0
                   for k in ERROR_KINDS},
                ("kd_teacher_batches", frozenset({("app", "app")})): 0,
                ("kd_teacher_in_flight", frozenset({("app", "app"), ("replica", "r1")})): 0,
                ("kd_teacher_run_samples_per_s", frozenset({("app", "app"), ("run", ""), ("replica", "r1")})): 0}
    assert ray_metrics.series == expected  # histograms: nothing until observed (Ray exports no empty one)


def test_ray_sink_zeroes_a_runs_series_at_its_first_call_and_then_mirrors_the_counters(monkeypatch):
    from teacher_service.stats import ERROR_KINDS, RayMetricsSink

    ray_metrics = RayMetricStandIns(monkeypatch)
    counters = known_sequence(Clock(), RayMetricsSink("app", "r1"))
    counters.reused("b", 0, 2)
    counters.scored("b", 4, reused=False, score_s=0.5)
    counters.scored("a", 3, reused=True)
    runs = counters.snapshot()["runs"]
    accepted = {"a": 4, "b": 2, "anonymous": 0}  # kd_teacher_requests counts accepted requests
    for run in ("a", "b", "anonymous"):
        tags = {"app": "app", "run": run}
        assert ray_metrics.value("kd_teacher_requests", **tags) == accepted[run]
        exported = {key: ray_metrics.value(f"kd_teacher_{name}", **tags) for key, name in (
            ("samples_requested", "samples_requested"), ("samples", "samples_answered"),
            ("samples_computed", "samples_computed"), ("samples_coalesced", "samples_coalesced"),
            ("samples_from_cache", "samples_from_cache"), ("scores_requested", "scores_requested"),
            ("scores_computed", "scores_computed"), ("scores_reused", "scores_reused"))}
        assert exported == {key: runs[run][key] for key in exported}, run  # 0 where nothing was counted
        errors = {k: ray_metrics.value("kd_teacher_errors", **tags, kind=k) for k in ERROR_KINDS}
        assert sum(errors.values()) == runs[run]["errors"] and set(errors) == set(ERROR_KINDS)
    assert ray_metrics.value("kd_teacher_errors", app="app", run="a", kind="internal") == 1
    assert ray_metrics.value("kd_teacher_errors", app="app", run="anonymous", kind="invalid") == 1
    assert ray_metrics.value("kd_teacher_samples_from_cache", app="app", run="b") == 2
    assert ray_metrics.value("kd_teacher_samples_coalesced", app="app", run="b") == 0
    assert (ray_metrics.value("kd_teacher_scores_computed", app="app", run="b"),
            ray_metrics.value("kd_teacher_scores_reused", app="app", run="a"),
            ray_metrics.value("kd_teacher_scores_requested", app="app", run="a")) == (4, 3, 3)
    assert counters.snapshot()["score_s"] == 0.5
    assert ray_metrics.value("kd_teacher_batches", app="app") == 2
    assert ray_metrics.value("kd_teacher_in_flight", app="app", replica="r1") == 0
    assert sorted(ray_metrics.value("kd_teacher_batch_fill_ratio", app="app")) == pytest.approx([6 / 16, 10 / 16])
    assert len(ray_metrics.value("kd_teacher_queue_wait_s", app="app")) == 4
    assert all(v == 0 for tags, v in ray_metrics.named("kd_teacher_requests").items() if ("run", "") in tags)


def test_the_ingress_sink_exports_only_its_refusals_at_zero_then_counts_them(monkeypatch):
    from teacher_service.stats import ERROR_KINDS, RayMetricsSink

    ray_metrics = RayMetricStandIns(monkeypatch)
    counters = TeacherCounters(1, "app", "grpc-ingress", sink=RayMetricsSink("app", "grpc-ingress", "ingress"))
    assert ray_metrics.kinds == {"kd_teacher_errors": "counter"}  # not a replica: no in-flight gauge to count
    assert ray_metrics.named("kd_teacher_errors") == {
        frozenset({("app", "app"), ("run", ""), ("kind", k)}): 0 for k in ERROR_KINDS}
    counters.refused(counters.received("grpc:10.0.0.7"), "unauthenticated")
    assert {k: ray_metrics.value("kd_teacher_errors", app="app", run="grpc:10.0.0.7", kind=k) for k in ERROR_KINDS
            } == {k: int(k == "unauthenticated") for k in ERROR_KINDS}
    with pytest.raises(ValueError, match="metrics source: expected one of"):
        RayMetricsSink("app", "x", "proxy")


def test_run_names_are_bounded_and_labelled():
    c = TeacherCounters(8)
    labels = {c.received(f"run-{i}") for i in range(MAX_RUNS + 10)}
    assert len(c.snapshot()["runs"]) == MAX_RUNS + 1 and "other" in labels
    assert c.snapshot()["runs"]["other"]["requests_received"] == 10
    assert c.received(None) == "other"  # a new label past the bound
    assert TeacherCounters(8).received(123) == "invalid" and TeacherCounters(8).received("x" * 100) == "x" * 64


def test_merge_pools_replicas():
    one = known_sequence(Clock()).snapshot(include_samples=True)
    two = TeacherCounters(16, app_name="app", replica="r2", clock=Clock(3.0))
    lab = two.received("c")
    two.accepted(lab, 16)
    two.batch_done([(lab, 16, 3.0)], [True], started=3.9, ended=4.0)
    two.answered(lab, 16)
    merged = merge_stats([one, two.snapshot(include_samples=True)])
    assert merged["requests"] == 5 and merged["samples_computed"] == 32 and merged["batches"] == 3
    assert merged["batch_fill_mean"] == pytest.approx((10 / 16 + 6 / 16 + 1.0) / 3)
    assert merged["max_batch_samples"] == 16 and merged["replicas_answered"] == 2
    assert merged["queue_wait_max_s"] == pytest.approx(0.9)  # the other replica's wait is pooled
    assert merged["queue_wait_p50_s"] == pytest.approx(0.4)  # of 0.2, 0.3, 0.4, 0.5, 0.9
    assert set(merged["runs"]) == {"a", "b", "c", "anonymous"} and merged["runs"]["c"]["samples"] == 16
    assert set(merged["replicas"]) == {"r1", "r2"} and merged["replicas"]["r2"]["batches"] == 1
    assert percentile([], 50) is None and percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert merged["gpu_peak_bytes"] is None  # no replica used CUDA
    on_gpu = merge_stats([{**one, "gpu_peak_bytes": 3 * 2**30}, {**one, "replica": "r2", "gpu_peak_bytes": 2**30},
                          {**one, "replica": "r3", "gpu_peak_bytes": None}])
    assert on_gpu["gpu_peak_bytes"] == 4 * 2**30 and on_gpu["replicas"]["r2"]["gpu_peak_bytes"] == 2**30
    with pytest.raises(ValueError, match="no replica snapshots"):
        merge_stats([])


def test_gpu_peak_is_none_in_a_process_that_never_used_cuda():
    """A CPU replica reports no GPU figure rather than a zero that reads as 'measured, none used'."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA already used in this process")
    assert gpu_peak_bytes() is None


def test_a_runs_weight_is_its_latest_requests_and_merges_as_the_largest():
    one, two = TeacherCounters(8, replica="r1"), TeacherCounters(8, replica="r2")
    for counters, weights in ((one, (3.0, 1.0)), (two, (2.0,))):
        for w in weights:
            counters.accepted(counters.received("a"), 4, w)
    counters.accepted(counters.received("unweighted"), 4)
    assert one.snapshot()["runs"]["a"]["weight"] == 1.0 and "weight" not in two.snapshot()["runs"]["unweighted"]
    assert merge_stats([one.snapshot(), two.snapshot()])["runs"]["a"]["weight"] == 2.0


# ------------------------------------------------------------------------------------ batching
async def _batches_formed_while_busy(max_batch: int, sizes: list[int]) -> tuple[list[list[int]], list]:
    """First request starts a forward that blocks; `sizes` arrive meanwhile; then it is released."""
    release, started = asyncio.Event(), asyncio.Event()
    formed: list[list[int]] = []

    async def run_batch(batch):
        formed.append([q.size for q in batch])
        started.set()
        await release.wait()
        return [q.request for q in batch]

    batcher = SampleBatcher(run_batch, max_batch, batch_wait_timeout_s=0.001)
    first = asyncio.create_task(batcher.submit("first", 4, 0.0))
    await started.wait()
    rest = [asyncio.create_task(batcher.submit(f"r{i}", n, 0.0)) for i, n in enumerate(sizes)]
    await asyncio.sleep(0.05)  # far beyond the batch wait timeout: Serve's loop would have sealed batches
    assert formed == [[4]]  # nothing formed while the forward runs
    release.set()
    results = await asyncio.gather(first, *rest)
    return formed, results


def test_batcher_coalesces_arrivals_during_a_forward():
    formed, results = asyncio.run(_batches_formed_while_busy(16, [4, 4, 4, 4, 4]))
    assert formed == [[4], [4, 4, 4, 4], [4]]  # FIFO, full batch of 16 samples, then the rest
    assert results == ["first"] + [f"r{i}" for i in range(5)]


def test_batcher_runs_oversized_request_alone_and_delivers_errors():
    formed, _ = asyncio.run(_batches_formed_while_busy(8, [20, 3, 3]))
    assert formed == [[4], [20], [3, 3]]

    async def failing():
        async def run_batch(batch):
            raise RuntimeError("forward exploded")
        batcher = SampleBatcher(run_batch, 8, 0.0)
        return await asyncio.gather(batcher.submit("x", 1, 0.0), batcher.submit("y", 1, 0.0),
                                    return_exceptions=True)

    assert [str(e) for e in asyncio.run(failing())] == ["forward exploded"] * 2


def test_batcher_skips_cancelled_requests():
    async def scenario():
        release, started = asyncio.Event(), asyncio.Event()
        seen = []

        async def run_batch(batch):
            seen.append([q.request for q in batch])
            started.set()
            await release.wait()
            return [q.request for q in batch]

        batcher = SampleBatcher(run_batch, 8, 0.001)
        first = asyncio.create_task(batcher.submit("first", 1, 0.0))
        await started.wait()
        gone = asyncio.create_task(batcher.submit("gone", 1, 0.0))
        kept = asyncio.create_task(batcher.submit("kept", 1, 0.0))
        await asyncio.sleep(0.01)
        gone.cancel()
        release.set()
        assert await first == "first" and await kept == "kept"
        return seen

    assert asyncio.run(scenario()) == [["first"], ["kept"]]


def test_deployment_path_without_serve_counts_and_answers():
    """The replica class itself (no Serve): concurrent callers share forwards; counters match."""
    cfg = TeacherConfig.from_dict({**TINY, "serving": {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}})
    replica = TeacherDeployment.func_or_class(cfg.replica_dict())
    reqs = [request(4, seed, run=f"run{seed % 2}") for seed in range(6)]

    async def scenario():
        answers = await asyncio.gather(*[replica.embed(r) for r in reqs])
        with pytest.raises(RequestError, match="grayscale"):
            await replica.embed(EmbedRequest(keys=["g"], images=np.zeros((1, 32, 32), np.uint8), run="run0"))
        return answers

    answers = asyncio.run(scenario())
    want = TeacherEngine(load_teacher(cfg)).embed_many(reqs)
    for got, w in zip(answers, want):
        assert got.keys == w.keys
        np.testing.assert_allclose(got.image_features.astype(np.float32), w.image_features.astype(np.float32),
                                   atol=2e-3)
    s = replica.counters.snapshot()
    assert s["requests_received"] == 7 and s["requests"] == 6 and s["errors_invalid"] == 1
    assert s["samples_requested"] == s["samples_computed"] == s["samples"] == 24
    assert s["batches"] == 2 and s["max_batch_samples"] == 16  # 6 concurrent requests → 16 + 8 samples
    assert s["batch_fill_mean"] == pytest.approx((16 / 16 + 8 / 16) / 2)
    assert s["runs"]["run0"]["samples"] == 12 and s["runs"]["run0"]["errors"] == 1
    assert s["queue_wait_count"] == 6 and s["queue_wait_p99_s"] >= s["queue_wait_p50_s"] >= 0


# ------------------------------------------------------------------------------------ on Serve
@pytest.mark.ray
def test_stats_over_two_replicas_and_kd_teacher_status(ray_cluster, capsys):
    from ray import serve

    from cluster.cli import main
    from teacher_service.app import collect_stats, deploy, get_teacher_handle

    app = "kd-teacher-stats-test"
    cfg = TeacherConfig.from_dict({**TINY, "serving": {"app_name": app, "num_replicas": 2, "num_cpus": 0.25,
                                                       "max_batch_size": 32, "batch_wait_timeout_s": 0.05}})
    deploy(cfg)
    try:
        handle = get_teacher_handle(app, timeout_s=300)
        sent = {"alpha": [request(4, s, "alpha") for s in range(6)], "beta": [request(2, 10 + s, "beta")
                                                                          for s in range(3)]}

        def caller(reqs):
            for r in [handle.embed.remote(r) for r in reqs]:
                r.result(timeout_s=120)

        threads = [threading.Thread(target=caller, args=(reqs,)) for reqs in sent.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        with pytest.raises(RequestError):
            handle.embed.remote(EmbedRequest(keys=[], run="alpha")).result(timeout_s=60)

        stats = collect_stats(handle)
        assert stats["replicas_answered"] == 2 and stats["replicas_failed"] == 0
        assert stats["requests_received"] == 10 and stats["requests"] == 9 and stats["errors_invalid"] == 1
        assert stats["samples_requested"] == stats["samples_computed"] == stats["samples"] == 30
        assert stats["in_flight"] == 0 and stats["batches"] <= 9
        assert stats["runs"]["alpha"]["samples"] == 24 and stats["runs"]["beta"]["samples"] == 6
        assert stats["runs"]["alpha"]["errors"] == 1 and stats["runs"]["beta"]["samples_per_s"] > 0
        assert sum(r["requests"] for r in stats["replicas"].values()) == 9
        assert 0 < stats["batch_fill_mean"] <= 1 and stats["queue_wait_count"] == 9

        assert main(["teacher", "status", "--app-name", app]) == 0
        text = capsys.readouterr().out
        assert "2 answered" in text and "requested 30, computed 30, coalesced 0, from cache 0, answered 30" in text
        assert "invalid 1" in text and "alpha" in text and "beta" in text
        assert main(["teacher", "status", "--app-name", app, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["stats"]["samples"] == 30 and report["info"]["fingerprint"] == stats["fingerprint"]
    finally:
        serve.delete(app)


def test_replica_answers_a_broken_forward_with_an_error_and_keeps_serving(monkeypatch):
    """NaN features from the teacher: that caller gets TeacherOutputError, counted as internal;
    the replica answers the next request normally."""
    from teacher_service.serve.engine import TeacherOutputError

    replica = TeacherDeployment.func_or_class(TeacherConfig.from_dict(TINY).replica_dict())
    real = replica.teacher.encode_tensors
    broken = {"on": True}

    def encode(pixels=None, tokens=None):
        out = real(pixels, tokens)
        if broken["on"]:
            out["text_features"][:] = np.inf
        return out

    monkeypatch.setattr(replica.teacher, "encode_tensors", encode)

    async def scenario():
        with pytest.raises(TeacherOutputError, match="NaN/Inf text_features"):
            await replica.embed(request(2, 0, run="r"))
        broken["on"] = False
        return await replica.embed(request(2, 1, run="r"))

    assert np.isfinite(asyncio.run(scenario()).text_features).all()
    s = replica.counters.snapshot()
    assert s["errors_internal"] == 1 and s["requests"] == 1
