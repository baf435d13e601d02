"""Teacher sources without a cluster: RemoteTeacher against a scripted fake Serve handle, InlineTeacher
against TeacherEngine.

The fake handle mimics the two things RemoteTeacher relies on: `handle.<method>.remote(x)` returns at
once, and `.result(timeout_s=...)` blocks (here: returns or raises what the test scripted).
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import pytest

import teacher_service.app as app
from student_trainer.teacher import sources as teacher_client
from student_trainer.config import TeacherSourceConfig
from student_trainer.data.batches import Batch
from student_trainer.teacher.sources import (InlineTeacher, NoTeacher, RemoteTeacher, TeacherStats,
                                            make_request, make_teacher_source)
from teacher_service.config import TeacherConfig
from teacher_service.app import TeacherUnavailableError
from teacher_service.serve.engine import TeacherEngine
from teacher_service.model import load_teacher
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse, RequestError
from tiny_models import tiny_teacher_overrides

APP = "fake-teacher-app"
DIM = 6
B = 4  # samples per batch


# ---------------------------------------------------------------------------------------------
# a scripted fake Serve handle


def key_features(keys: list[str]) -> np.ndarray:
    """Rows that identify their sample: row i encodes the integer in keys[i]."""
    ids = np.array([int(k.split("-")[1]) for k in keys], dtype=np.float32)
    return (ids[:, None] / 1000.0 + np.arange(DIM, dtype=np.float32)[None, :] / 100.0).astype(np.float16)


class FakeResponse:
    """A DeploymentResponse stand-in: the outcome is decided when `.result` is called."""

    def __init__(self, handle: "FakeHandle", request, outcome: Callable[[], object]):
        self.handle, self.request, self.outcome, self.done = handle, request, outcome, False

    def result(self, timeout_s: Optional[float] = None):
        self.handle.result_timeouts.append(timeout_s)
        if not self.done and self.request is not None:
            self.done = True
            self.handle.outstanding -= 1
        self.handle.log.append(("result", _first_id(self.request)))
        value = self.outcome()
        if isinstance(value, BaseException):
            raise value
        return value


class FakeMethod:
    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def remote(self, *args):
        self.calls += 1
        return self.fn(*args)


class FakeHandle:
    """Answers embed requests with `key_features`; `script(call_no, request)` may override an answer.

    `script` returns None (answer normally), an exception instance (raised by `.result`), or an
    EmbedResponse (returned as is).
    """

    def __init__(self, fingerprint: str = "fp-A", script=None, info_error: Optional[BaseException] = None):
        self.fingerprint = fingerprint
        self.script = script or (lambda call_no, request: None)
        self.info_error = info_error
        self.log: list[tuple[str, int]] = []
        self.sent: list[EmbedRequest] = []
        self.outstanding = 0
        self.max_outstanding = 0
        self.result_timeouts: list[Optional[float]] = []
        self.embed = FakeMethod(self._embed)
        self.info = FakeMethod(self._info)

    def _info(self):
        info = {"fingerprint": self.fingerprint, "embed_dim": DIM, "app_name": APP}
        return FakeResponse(self, None, lambda: self.info_error or info)

    def _embed(self, request: EmbedRequest):
        call_no = len(self.sent)
        self.sent.append(request)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        self.log.append(("submit", _first_id(request)))

        def outcome():
            scripted = self.script(call_no, request)
            if scripted is not None:
                return scripted
            return response_for(request.keys, self.fingerprint)

        return FakeResponse(self, request, outcome)


def response_for(keys: list[str], fingerprint: str) -> EmbedResponse:
    return EmbedResponse(keys=list(keys), image_features=key_features(keys), text_features=key_features(keys)[:, ::-1],
                         logit_scale=1 / 0.07, logit_bias=None, fingerprint=fingerprint)


def _first_id(request) -> int:
    return -1 if request is None else int(request.keys[0].split("-")[1]) // B


def make_batches(n: int, log: Optional[list] = None):
    """n batches of B samples, keys 's-<global index>'; logs ('pull', t) when batch t is taken."""
    for t in range(n):
        if log is not None:
            log.append(("pull", t))
        keys = [f"s-{t * B + i}" for i in range(B)]
        yield Batch(keys=keys, images=np.full((B, 8, 8, 3), t, np.uint8), tokens=np.full((B, 5), t, np.int64),
                    labels=np.arange(B, dtype=np.int64), captions=[f"c{k}" for k in keys])


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record RemoteTeacher's back-off sleeps instead of sleeping (module-local, not global time.sleep);
    its monotonic clock advances by exactly the sleeps, so patience is counted in back-off time."""
    recorded: list[float] = []
    monkeypatch.setattr(teacher_client, "time", SimpleNamespace(perf_counter=time.perf_counter, sleep=recorded.append,
                                                                monotonic=lambda: sum(recorded)))
    return recorded


def remote(monkeypatch, handle: FakeHandle, **cfg) -> RemoteTeacher:
    """A RemoteTeacher built by its real constructor, with get_teacher_handle returning `handle`."""
    calls = []

    def fake_get_handle(app_name, timeout_s=60.0):
        calls.append((app_name, timeout_s))
        return handle

    monkeypatch.setattr(app, "get_teacher_handle", fake_get_handle)
    source_cfg = TeacherSourceConfig(mode="remote", app_name=APP, **{"timeout_s": 7.0, "patience_s": 0.0, **cfg})
    teacher = RemoteTeacher(source_cfg, run="unit-run")
    assert calls == [(APP, source_cfg.timeout_s)]
    return teacher


# ---------------------------------------------------------------------------------------------
# RemoteTeacher


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_window_is_bounded_and_runs_ahead(monkeypatch, sleeps, prefetch):
    handle = FakeHandle()
    teacher = remote(monkeypatch, handle, prefetch=prefetch)
    assert teacher.info["fingerprint"] == "fp-A" and teacher.embed_dim == DIM
    n = 7
    log = handle.log
    for t, (batch, out) in enumerate(teacher.stream(make_batches(n, log))):
        log.append(("yield", t))
        # every request the window may hold is in flight before t reaches the trainer...
        submitted = {i for kind, i in log if kind == "submit"}
        assert set(range(min(t + prefetch, n - 1) + 1)) <= submitted
        # ...but the input is not read further ahead than the window allows
        pulled = max(i for kind, i in log if kind == "pull")
        assert pulled <= t + prefetch
        # while batch t trains, exactly the requests for t+1 .. t+prefetch are in flight
        assert handle.outstanding == min(prefetch, n - 1 - t)
    assert handle.max_outstanding == min(prefetch + 1, n)
    assert [i for kind, i in log if kind == "yield"] == list(range(n))
    assert handle.embed.calls == n and sleeps == []
    assert teacher.stats.requests == n and teacher.stats.samples == n * B and teacher.stats.retries == 0
    assert all(t == 7.0 for t in handle.result_timeouts)  # every wait is bounded by cfg.timeout_s


@pytest.mark.parametrize("mode", ["remote", "hybrid"])
def test_an_eager_stream_has_its_first_window_in_flight_when_it_returns(monkeypatch, sleeps, tmp_path, mode):
    """`stream(eager=True)` sends the first prefetch window at the call (the loop builds its model
    or writes a checkpoint meanwhile); a lazy stream sends nothing before its first `next()`. Both
    answer every batch with its own rows, in order."""
    handle = FakeHandle()
    info = {"fingerprint": handle.fingerprint, "embed_dim": DIM, "app_name": APP, "context_length": 5,
            "logit_scale": 1 / 0.07}
    handle.info = FakeMethod(lambda: FakeResponse(handle, None, lambda: info))
    monkeypatch.setattr(app, "get_teacher_handle", lambda app_name, timeout_s=60.0: handle)
    cfg = TeacherSourceConfig(mode=mode, app_name=APP, prefetch=2, cache_path=str(tmp_path / "cache"))
    source = teacher_client.make_teacher_source(cfg, run="eager-run")
    lazy = source.stream(make_batches(4), view=0)
    assert handle.sent == []
    eager = source.stream(make_batches(5), view=1, eager=True)
    assert [r.keys[0] for r in handle.sent] == ["s-0", "s-4", "s-8"]  # batches 0..prefetch
    for stream, n in ((eager, 5), (lazy, 4)):
        answered = [(batch.keys, out.image_features) for batch, out in stream]
        assert [keys for keys, _ in answered] == [[f"s-{t * B + i}" for i in range(B)] for t in range(n)]
        for keys, features in answered:
            np.testing.assert_array_equal(features, key_features(keys))
    assert len(handle.sent) == 9


def test_prefetch_overlaps_compute_of_later_batches(monkeypatch, sleeps):
    """With prefetch=2, batches 1 and 2 are already requested when batch 0 is handed to the trainer."""
    handle = FakeHandle()
    teacher = remote(monkeypatch, handle, prefetch=2)
    stream = teacher.stream(make_batches(5))
    batch, _ = next(stream)
    assert batch.keys[0] == "s-0"
    assert {_first_id(r) for r in handle.sent} >= {0, 1, 2}
    assert [i for kind, i in handle.log if kind == "result"] == [-1, 0]  # info, then only batch 0
    stream.close()


def test_responses_match_their_batches(monkeypatch, sleeps):
    # batch 2's first attempt fails, so its answer comes from a re-sent request after 3 and 4 were sent
    script = lambda call_no, req: TimeoutError("slow replica") if call_no == 2 else None  # noqa: E731
    handle = FakeHandle(script=script)
    teacher = remote(monkeypatch, handle, prefetch=2, retries=1)
    seen = []
    for batch, out in teacher.stream(make_batches(6)):
        np.testing.assert_array_equal(out.image_features, key_features(batch.keys))
        np.testing.assert_array_equal(out.text_features, key_features(batch.keys)[:, ::-1])
        assert out.image_features.dtype == np.float16
        assert out.fingerprint == "fp-A" and out.logit_scale == pytest.approx(1 / 0.07)
        assert out.logit_bias is None
        seen.append(batch.keys[0])
    assert seen == [f"s-{t * B}" for t in range(6)]
    assert [_first_id(r) for r in handle.sent] == [0, 1, 2, 3, 4, 2, 5]


def test_request_payload_is_the_batch(monkeypatch, sleeps):
    handle = FakeHandle()
    teacher = remote(monkeypatch, handle, prefetch=1)
    batches = list(make_batches(3))
    list(teacher.stream(iter(batches)))
    for req, batch in zip(handle.sent, batches):
        assert req.keys == batch.keys and req.run == "unit-run"
        assert req.images is batch.images and req.tokens is batch.tokens  # uint8/int64 as produced


@pytest.mark.parametrize("failure", [TimeoutError("result timed out"), ConnectionError("replica died")])
def test_failed_call_is_resent_and_counted(monkeypatch, sleeps, failure):
    # call 0 is batch 0, call 1 the prefetched batch 1; calls 2 and 3 are re-sends of batch 0
    script = lambda call_no, req: failure if call_no in (0, 2) else None  # noqa: E731
    handle = FakeHandle(script=script)
    teacher = remote(monkeypatch, handle, prefetch=1, retries=2)
    out = [(b.keys, o) for b, o in teacher.stream(make_batches(3))]
    assert [keys[0] for keys, _ in out] == ["s-0", "s-4", "s-8"]
    for keys, o in out:
        np.testing.assert_array_equal(o.image_features, key_features(keys))
    assert [_first_id(r) for r in handle.sent] == [0, 1, 0, 0, 2]
    assert all(r.keys == [f"s-{i}" for i in range(B)] for r in handle.sent if _first_id(r) == 0)
    assert teacher.stats.retries == 2
    assert teacher.stats.requests == 3 and teacher.stats.samples == 3 * B  # retries are not new requests
    assert sleeps == [1.0, 2.0]  # exponential back-off between attempts


@pytest.mark.timeout(20)
def test_gives_up_after_retries_with_the_app_named(monkeypatch, sleeps):
    handle = FakeHandle(script=lambda call_no, req: TimeoutError("no answer"))
    teacher = remote(monkeypatch, handle, prefetch=1, retries=2, timeout_s=3.0)
    stream = teacher.stream(make_batches(4))
    with pytest.raises(TeacherUnavailableError, match=rf"{APP}.*3 attempts") as err:
        next(stream)
    assert isinstance(err.value.__cause__, TimeoutError)
    assert teacher.stats.retries == 2
    assert [_first_id(r) for r in handle.sent] == [0, 1, 0, 0]  # prefetch of 1, then two re-sends of 0
    assert handle.result_timeouts == [3.0] * 4  # info + three embed attempts
    assert sleeps == [1.0, 2.0]


def test_backoff_is_capped(monkeypatch, sleeps):
    handle = FakeHandle(script=lambda call_no, req: TimeoutError("no answer"))
    teacher = remote(monkeypatch, handle, prefetch=0, retries=6)
    with pytest.raises(TeacherUnavailableError, match="7 attempts"):
        next(teacher.stream(make_batches(1)))
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert teacher.stats.retries == 6


def test_patience_outlasts_the_retry_count_until_the_teacher_is_back(monkeypatch, sleeps):
    """A pool down for ~40 s (of back-off time) is waited for with patience 60, although that
    takes more re-sends than `retries`; the batch is then answered and the stream goes on."""
    down_until = 40.0
    handle = FakeHandle(script=lambda call_no, req: TimeoutError("down") if sum(sleeps) < down_until else None)
    teacher = remote(monkeypatch, handle, prefetch=0, retries=1, patience_s=60.0)
    outs = list(teacher.stream(make_batches(2)))
    assert [b.keys for b, _ in outs] == [[f"s-{i}" for i in range(B)], [f"s-{B + i}" for i in range(B)]]
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]  # re-sent until 45 s of back-off passed 40
    assert teacher.stats.retries == 7


def test_patience_spent_gives_up_naming_it(monkeypatch, sleeps):
    handle = FakeHandle(script=lambda call_no, req: TimeoutError("down"))
    teacher = remote(monkeypatch, handle, prefetch=0, retries=1, patience_s=20.0)
    with pytest.raises(TeacherUnavailableError, match=r"6 attempts .* over 25 s \(patience 20 s\)"):
        next(teacher.stream(make_batches(1)))
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 10.0]  # the first failure is at t=0; gives up at t=25 >= 20


def test_constructor_fails_fast_when_info_never_answers(monkeypatch, sleeps):
    handle = FakeHandle(info_error=TimeoutError("no replica"))
    with pytest.raises(TeacherUnavailableError, match=rf"teacher app '{APP}'.*info call.*2 attempts"):
        remote(monkeypatch, handle, retries=1)
    assert handle.info.calls == 2 and sleeps == [1.0]


class WrappedTaskError(Exception):
    """Like Ray's RayTaskError: the replica's exception travels as `.cause`."""

    def __init__(self, cause: BaseException):
        super().__init__(f"task failed: {cause}")
        self.cause = cause


@pytest.mark.parametrize("error", [RequestError("images: expected uint8"),
                                   WrappedTaskError(RequestError("tokens: id out of range"))])
def test_request_error_is_not_retried(monkeypatch, sleeps, error):
    handle = FakeHandle(script=lambda call_no, req: error if call_no == 1 else None)
    teacher = remote(monkeypatch, handle, prefetch=0, retries=3)
    stream = teacher.stream(make_batches(3))
    next(stream)
    with pytest.raises(type(error)) as err:
        next(stream)
    assert err.value is error
    assert teacher.stats.retries == 0 and sleeps == []
    assert [_first_id(r) for r in handle.sent] == [0, 1]  # batch 1 was sent once, never re-sent


def test_fingerprint_change_mid_run_raises(monkeypatch, sleeps):
    handle = FakeHandle()
    handle.script = lambda call_no, req: response_for(req.keys, "fp-B") if call_no >= 2 else None
    teacher = remote(monkeypatch, handle, prefetch=0)
    stream = teacher.stream(make_batches(4))
    assert [b.keys[0] for b, _ in (next(stream), next(stream))] == ["s-0", "s-4"]
    with pytest.raises(RuntimeError, match=r"fingerprint changed.*fp-A.*fp-B"):
        next(stream)


def test_fingerprint_differing_from_info_raises(monkeypatch, sleeps):
    """The app was redeployed between `info()` and the first batch: metrics would name the wrong teacher."""
    handle = FakeHandle(fingerprint="fp-A")
    handle.script = lambda call_no, req: response_for(req.keys, "fp-B")
    teacher = remote(monkeypatch, handle, prefetch=0)
    with pytest.raises(RuntimeError, match=r"fingerprint changed.*fp-A.*fp-B"):
        next(teacher.stream(make_batches(2)))


def test_answer_for_other_keys_raises(monkeypatch, sleeps):
    handle = FakeHandle()
    handle.script = lambda call_no, req: response_for(req.keys[::-1], "fp-A") if call_no == 1 else None
    teacher = remote(monkeypatch, handle, prefetch=1)
    stream = teacher.stream(make_batches(3))
    next(stream)
    with pytest.raises(RuntimeError, match="other sample keys"):
        next(stream)


def test_stats_metrics_names():
    stats = TeacherStats(requests=3, samples=48, retries=1, wait_s=0.123456)
    assert stats.as_metrics() == {"teacher_requests": 3, "teacher_samples": 48, "teacher_samples_by_reference": 0,
                                  "teacher_retries": 1, "teacher_wait_s": 0.1235,
                                  "teacher_compute_s": 0.0}


# ---------------------------------------------------------------------------------------------
# NoTeacher, InlineTeacher, dispatch

TINY_TEACHER = tiny_teacher_overrides()


def real_batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for t in range(n):
        tokens = np.zeros((B, 20), np.int64)  # longer than the teacher's context: it must fit them
        tokens[:, 0] = 49406
        tokens[:, 1:6] = rng.integers(1, 49000, (B, 5))
        tokens[:, 6] = 49407
        keys = [f"r-{t * B + i}" for i in range(B)]
        yield Batch(keys=keys, images=rng.integers(0, 256, (B, 28, 36, 3), dtype=np.uint8), tokens=tokens,
                    labels=np.arange(B, dtype=np.int64), captions=keys)


def test_inline_teacher_equals_engine():
    teacher_cfg = TeacherConfig(overrides=TINY_TEACHER)
    source = make_teacher_source(TeacherSourceConfig(mode="inline", teacher=teacher_cfg), run="inline-run",
                                 device="cpu")
    assert isinstance(source, InlineTeacher)
    reference = TeacherEngine(load_teacher(teacher_cfg))
    assert source.embed_dim == 48 and source.info["fingerprint"] == reference.teacher.fingerprint
    assert source.info["device"] == "cpu"
    batches = list(real_batches(3))
    outputs = list(source.stream(iter(batches)))
    assert [b.keys for b, _ in outputs] == [b.keys for b in batches]
    for (batch, out) in outputs:
        want = reference.embed(make_request(batch, "inline-run"))
        for field in ("image_features", "text_features"):
            got = getattr(out, field)
            assert got.dtype == np.float16 and got.shape == (B, 48)
            np.testing.assert_allclose(got.astype(np.float32), getattr(want, field).astype(np.float32), atol=1e-3)
            np.testing.assert_allclose(np.linalg.norm(got.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert out.logit_scale == pytest.approx(want.logit_scale) and out.logit_bias is None
        assert out.fingerprint == want.fingerprint
    # different inputs give different features (the comparison above is not vacuous)
    assert not np.allclose(outputs[0][1].image_features, outputs[1][1].image_features, atol=1e-2)
    assert source.stats.requests == 3 and source.stats.samples == 3 * B and source.stats.wait_s > 0


def test_no_teacher_and_dispatch():
    source = make_teacher_source(TeacherSourceConfig(mode="none"), run="r")
    assert isinstance(source, NoTeacher) and source.embed_dim is None
    batches = list(make_batches(2))
    assert [(b, o) for b, o in source.stream(iter(batches))] == [(batches[0], None), (batches[1], None)]
    assert source.stats.requests == 0
    with pytest.raises(ValueError, match="'grpc'"):
        make_teacher_source(TeacherSourceConfig(mode="grpc"), run="r")
