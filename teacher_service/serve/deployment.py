"""The teacher as a Ray Serve deployment: a detached, named replica pool with sample-counted batching.

Serve apps outlive the job that deployed them, so one `deploy()` serves every student run that
later calls `get_teacher_handle(app_name)`. Requests are validated before they join a batch (a bad
request fails alone); the batch itself is `TeacherEngine.embed_many`, run in a single worker thread.

Batching is `batching.SampleBatcher` by default (`serving.batcher = "fill"`): it forms a
batch only when the forward is free, where `@serve.batch` (`batcher = "serve"`, kept for
comparison) seals the next batch while the previous forward still runs (see `batching`).

Every replica keeps `TeacherCounters` (requests, samples requested / computed, scores requested /
computed / reused, errors, batch fill, queue wait and forward percentiles, per-run throughput), returned by `stats()` and exported as Ray
metrics; `collect_stats` merges them over all replicas (Serve's handle broadcast). Callers
outside Ray use the app's gRPC ingress (`teacher_service.grpc.ingress`, started by `deploy` when
`grpc.port` is set), which forwards to `embed` through a handle like any student.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from teacher_service.serve.batching import Queued, SampleBatcher
from teacher_service.serve.coalesce import Coalescer
from teacher_service.config import ServingConfig, TeacherConfig
from teacher_service.serve.engine import TeacherEngine
from teacher_service.serve.references import ViewResolver
from teacher_service.model import load_teacher
from teacher_service.contract.answer_codec import encode_response
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse, RequestError, RequestLimits
from teacher_service.scores import ScoreMemo, teacher_scores
from teacher_service.stats import TeacherCounters, gpu_peak_bytes, ray_metrics_sink, rss_bytes

log = logging.getLogger(__name__)


# ======================================================================================= deployment
@serve.deployment
class TeacherDeployment:
    """One replica: a frozen teacher, its engine, a SampleBatcher and the replica's counters.

    `config` is `TeacherConfig.replica_dict()`: the model and serving sections, no gRPC."""

    def __init__(self, config: dict):
        self.cfg = TeacherConfig.from_dict(config)
        self.serving = serving = self.cfg.serving
        self.teacher = load_teacher(self.cfg)
        self.views = view_resolver(serving)
        self.engine = TeacherEngine(self.teacher, RequestLimits(max_samples=serving.max_request_samples,
                                                                max_weight=serving.max_run_weight), self.views)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-forward")
        self._views_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-views")
        self._digests = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-digest")
        self.coalescer = Coalescer(serving.coalesce_memory_rows, self.teacher.logit_scale,
                                   self.teacher.logit_bias, self.teacher.fingerprint,
                                   self.teacher.context_length, digest_executor=self._digests)
        self.score_memo = ScoreMemo(serving.coalesce_memory_rows)  # the recent rows' horizon, for their scores
        self._clock = time.monotonic
        self._started = time.time()
        self.replica = _replica_id()
        self.counters = TeacherCounters(serving.max_batch_size, serving.app_name, self.replica,
                                        clock=self._clock, sink=ray_metrics_sink(serving.app_name, self.replica))
        self.batcher = SampleBatcher(self._run_batch, serving.max_batch_size, serving.batch_wait_timeout_s)
        self._serve_batch.set_max_batch_size(serving.max_batch_size)
        self._serve_batch.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)

    # ---- the handle API
    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """Embed one mini-batch (and score its samples when it asks: `EmbedRequest.scores`); a
        RequestError goes to this caller only. The features come back in the request's
        `answer_dtype` (default `serving.answer_dtype`), encoded for this response alone after
        scoring, so the scores come from the full-precision rows whatever the dtype."""
        return await self._embed(request, self._clock())

    async def info(self) -> dict[str, Any]:
        """Teacher identity (fingerprint, sizes, scales) and the limits clients must respect."""
        return {**self.teacher.info(), "app_name": self.serving.app_name, "answer_dtype": self.serving.answer_dtype,
                "max_batch_size": self.serving.max_batch_size,
                "max_request_samples": self.serving.max_request_samples,
                "by_reference": self.views is not None,
                "replica": self.replica, "uptime_s": time.time() - self._started}

    async def check_shards(self, paths: list[str], sizes: list[int] | None = None) -> dict[str, str]:
        """Path → "" where this replica can regenerate views of the shard, else why not (a caller
        deciding whether to send references, `send_pixels: auto`)."""
        if self.views is None:
            return {p: "this teacher reads no shards (its serving.shard_roots are empty)" for p in paths}
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._views_pool, self.views.check_shards, list(paths), sizes)

    async def stats(self, include_samples: bool = False) -> dict[str, Any]:
        """This replica's counters (`TeacherCounters.snapshot`); `collect_stats` merges all replicas."""
        return {**self.counters.snapshot(include_samples), "fingerprint": self.teacher.fingerprint,
                "model": self.cfg.model, "uptime_s": time.time() - self._started,
                "coalesce_in_flight_rows": self.coalescer.in_flight_rows(),
                "coalesce_recent_rows": self.coalescer.recent_rows(), "score_memo_rows": self.score_memo.rows(),
                "rss_bytes": rss_bytes(),
                "gpu_peak_bytes": gpu_peak_bytes(),
                **(self.views.stats if self.views is not None else {})}

    # ---- internals
    async def _embed(self, request: EmbedRequest, arrived: float) -> EmbedResponse:
        label = self.counters.received(getattr(request, "run", None))
        try:
            self.engine.validate(request)
            request, image_digests = await self._materialize(request)
        except RequestError:
            self.counters.refused(label, "invalid")
            raise
        size = len(request)
        self.counters.accepted(label, size, request.weight)

        async def compute(part: EmbedRequest) -> EmbedResponse:
            result = await self._submit((label, part), len(part), arrived, label, float(part.weight))
            if isinstance(result, Exception):
                raise result
            return result

        try:
            result, reuse = await self.coalescer.embed(request, compute, image_digests)
        except asyncio.CancelledError:
            self.counters.cancelled(label)
            raise
        except Exception:
            self.counters.failed(label)
            raise
        self.counters.reused(label, reuse.coalesced, reuse.from_cache)
        if request.scores:
            result = await self._scored(result, reuse.batch, label)
        self.counters.answered(label, size)
        return encode_response(result, request.answer_dtype or self.serving.answer_dtype)

    async def _scored(self, response: EmbedResponse, batch: bytes, label: str) -> EmbedResponse:
        """`response` with each row's score (`teacher_service.scores`) among the request's rows: the
        scores of an identical request (`batch`, its samples' identities in order) where this
        replica remembers them, else computed off the event loop and charged to `compute_s`."""
        remembered = self.score_memo.get(batch) if batch else None
        if remembered is not None:
            self.counters.scored(label, len(response), reused=True)
            return dataclasses.replace(response, scores=remembered)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        scores = await loop.run_in_executor(self._digests, teacher_scores, response.image_features,
                                            response.text_features, response.logit_scale)
        spent = time.perf_counter() - started
        if batch:
            self.score_memo.put(batch, scores)
        self.counters.scored(label, len(response), reused=False, score_s=spent)
        return dataclasses.replace(response, scores=scores, compute_s=response.compute_s + spent)

    async def _materialize(self, request: EmbedRequest) -> tuple[EmbedRequest, list[bytes] | None]:
        """Pixels for a request by reference, read and checked off the event loop (decode and
        augment take ~0.1-1 ms a sample); from here on it is a pixel request like any other, whose
        pixel digests the check already computed (None for a pixel request)."""
        if request.image_refs is None:
            return request, None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._views_pool, self.engine.materialize, request)

    async def _submit(self, payload: tuple, size: int, arrived: float, run: str = "", weight: float = 1.0):
        """payload = (run label, request); `run`/`weight` drive the fill batcher's fair share."""
        if self.serving.batcher == "fill":
            return await self.batcher.submit(payload, size, arrived, run, weight)
        item = Queued(payload, size, arrived, None)
        if size > self.serving.max_batch_size:  # Serve's queue refuses an item larger than a batch
            return (await self._run_batch([item]))[0]
        return await self._serve_batch(item)

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=lambda items: sum(q.size for q in items))
    async def _serve_batch(self, items: list[Queued]) -> list:
        """`batcher="serve"`: Serve's own batching, for comparison with SampleBatcher."""
        return await self._run_batch(list(items))

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


def view_resolver(serving: ServingConfig) -> ViewResolver | None:
    """The replica's reader of shards named by reference; None (pixels only) without shard_roots."""
    if not serving.shard_roots:
        return None
    return ViewResolver(serving.shard_roots, cache_bytes=int(serving.shard_cache_mb * 2**20))


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (direct construction in tests)
        return "local"


# ============================================================================================ apps
def build_app(cfg: TeacherConfig):
    """The Serve application for `cfg` (not yet running); a bad shard_roots fails here, not in a replica.
    Replicas get the model and serving sections only (`TeacherConfig.replica_dict`)."""
    view_resolver(cfg.serving)
    return TeacherDeployment.options(**cfg.serving.serve_options()).bind(cfg.replica_dict())


class ServeConfigError(ValueError, RayServeException):
    """A Serve config whose `args` are not a valid teacher. Serve reports a RayServeException raised
    by an app builder as the app's DEPLOY_FAILED message, as it is, once; any other exception it
    retries in 3 more build tasks and reports as a traceback."""


def app_builder(args: dict):
    """Serve config entry point (import_path teacher_service.serve.deployment:app_builder); `args` is a
    TeacherConfig mapping: sectioned (model fields, `serving`, `grpc`) or the deprecated flat one.
    A bad config (an unknown model, a missing checkpoint, ...) fails `serve deploy` here, with the
    message `kd teacher serve` prints for it, before any replica starts."""
    try:
        return build_app(TeacherConfig.from_dict(dict(args or {}), where="Serve config args"))
    except ValueError as e:
        raise ServeConfigError(str(e)) from None
