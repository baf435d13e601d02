"""Teacher sources for a student worker: none, inline (OpenCLIP-style) or the remote Serve pool.

Every source turns a stream of `Batch`es into a stream of `(Batch, teacher_outputs)`; the remote
source keeps `prefetch` requests in flight so the teacher computes batch t+k while t trains.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from teacher_service.deployment import TeacherUnavailableError
from teacher_service.protocol import EmbedRequest, EmbedResponse, RequestError

from .config import TeacherSourceConfig
from .data import Batch

log = logging.getLogger(__name__)

TeacherOutputs = dict  # image_features / text_features (fp16 numpy), logit_scale, logit_bias, fingerprint


@dataclass
class TeacherStats:
    """Per-worker counters since this worker process started (after a resume: since the resume)."""

    requests: int = 0
    samples: int = 0
    retries: int = 0
    wait_s: float = 0.0  # time the training loop spent blocked on teacher results
    fingerprints: set = field(default_factory=set)

    def as_metrics(self) -> dict:
        return {"teacher_requests": self.requests, "teacher_samples": self.samples,
                "teacher_retries": self.retries, "teacher_wait_s": round(self.wait_s, 4)}


def make_request(batch: Batch, run: str) -> EmbedRequest:
    return EmbedRequest(keys=list(batch.keys), images=batch.images, tokens=batch.tokens, run=run)


def response_to_outputs(resp: EmbedResponse) -> TeacherOutputs:
    return {
        "image_features": resp.image_features,
        "text_features": resp.text_features,
        "logit_scale": resp.logit_scale,
        "logit_bias": resp.logit_bias,
        "fingerprint": resp.fingerprint,
    }


class NoTeacher:
    """Plain CLIP training: no teacher outputs."""

    embed_dim: Optional[int] = None
    info: dict = {}

    def __init__(self) -> None:
        self.stats = TeacherStats()

    def stream(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, Optional[TeacherOutputs]]]:
        for batch in batches:
            yield batch, None


class InlineTeacher:
    """The teacher loaded inside the student worker, as OpenCLIP does: the baseline to beat."""

    def __init__(self, cfg: TeacherSourceConfig, run: str, device: Optional[str] = None) -> None:
        from teacher_service.engine import TeacherEngine
        from teacher_service.model import load_teacher

        teacher_cfg = cfg.teacher
        if device is not None and teacher_cfg.device == "auto":
            teacher_cfg = type(teacher_cfg).from_dict({**teacher_cfg.to_dict(), "device": device})
        self.engine = TeacherEngine(load_teacher(teacher_cfg))
        self.info = self.engine.teacher.info()
        self.embed_dim = int(self.info["embed_dim"])
        self.run = run
        self.stats = TeacherStats()

    def stream(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, TeacherOutputs]]:
        for batch in batches:
            start = time.perf_counter()
            resp = self.engine.embed(make_request(batch, self.run))
            self.stats.wait_s += time.perf_counter() - start
            self.stats.requests += 1
            self.stats.samples += len(batch.keys)
            yield batch, response_to_outputs(resp)


class RemoteTeacher:
    """Teacher embeddings from the named Serve app, with a bounded prefetch window and retries."""

    def __init__(self, cfg: TeacherSourceConfig, run: str) -> None:
        from teacher_service.deployment import get_teacher_handle

        self.cfg = cfg
        self.run = run
        self.handle = get_teacher_handle(cfg.app_name, timeout_s=cfg.timeout_s)
        self.info = self._call(lambda: self.handle.info.remote(), "info")
        self.embed_dim = int(self.info["embed_dim"])
        self.stats = TeacherStats(fingerprints={self.info["fingerprint"]})  # answers must match info

    def _call(self, submit, what: str):
        """Submit and wait, re-submitting on failure; RequestError (our bug, not theirs) is not retried."""
        last: Optional[BaseException] = None
        for attempt in range(self.cfg.retries + 1):
            pending = None
            try:
                pending = submit()
                return pending.result(timeout_s=self.cfg.timeout_s)
            except RequestError:
                raise
            except Exception as exc:  # timeouts, dead replicas, app redeploys
                if _is_request_error(exc):
                    raise
                _cancel(pending)  # so a slow replica does not compute the re-sent batch twice
                last = exc
                if attempt < self.cfg.retries:
                    if hasattr(self, "stats"):
                        self.stats.retries += 1
                    log.warning("teacher %s call failed (%s); retry %d/%d", what, exc, attempt + 1,
                                self.cfg.retries)
                    time.sleep(min(2.0 ** attempt, 10.0))
        raise TeacherUnavailableError(
            f"teacher app {self.cfg.app_name!r} did not answer its {what} call after "
            f"{self.cfg.retries + 1} attempts of {self.cfg.timeout_s:.0f}s each: {last!r}. "
            f"Is it deployed? (`kd teacher serve` / `kd teacher status`)"
        ) from last

    def stream(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, TeacherOutputs]]:
        window: collections.deque = collections.deque()
        iterator = iter(batches)

        def submit_next() -> bool:
            batch = next(iterator, None)
            if batch is None:
                return False
            request = make_request(batch, self.run)
            window.append((batch, request, self.handle.embed.remote(request)))
            self.stats.requests += 1
            self.stats.samples += len(batch.keys)
            return True

        while True:
            # While batch t trains, the requests for t+1 .. t+prefetch are in flight.
            while len(window) <= self.cfg.prefetch and submit_next():
                pass
            if not window:
                return
            batch, request, pending = window.popleft()
            start = time.perf_counter()
            first = [pending]
            resp = self._call(lambda: first.pop() if first else self.handle.embed.remote(request), "embed")
            self.stats.wait_s += time.perf_counter() - start
            self._check(resp, batch)
            yield batch, response_to_outputs(resp)

    def _check(self, resp: EmbedResponse, batch: Batch) -> None:
        if list(resp.keys) != list(batch.keys):
            raise RuntimeError("teacher answered for other sample keys than were sent")
        self.stats.fingerprints.add(resp.fingerprint)
        if len(self.stats.fingerprints) > 1:
            raise RuntimeError(
                f"teacher fingerprint changed during the run: {sorted(self.stats.fingerprints)}; "
                "the teacher app was redeployed with other weights"
            )


def _cancel(pending) -> None:
    try:
        if pending is not None:
            pending.cancel()
    except Exception:  # cancelling is best effort: the replica may already be gone
        pass


def _is_request_error(exc: BaseException) -> bool:
    cause = getattr(exc, "cause", None) or exc.__cause__
    return isinstance(cause, RequestError) or "RequestError" in type(exc).__name__


def make_teacher_source(cfg: TeacherSourceConfig, run: str, device: Optional[str] = None):
    if cfg.mode == "none":
        return NoTeacher()
    if cfg.mode == "inline":
        return InlineTeacher(cfg, run, device)
    if cfg.mode == "remote":
        return RemoteTeacher(cfg, run)
    raise ValueError(f"teacher mode {cfg.mode!r}: expected none, inline or remote")
