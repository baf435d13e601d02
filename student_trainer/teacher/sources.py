"""Teacher sources for a student worker: none, inline (OpenCLIP-style), the remote Serve pool, a
precomputed embedding cache (`cache`), or cache hits plus pool misses appended to it (`hybrid`).

Every source turns a stream of `Batch`es into a stream of `(Batch, TeacherOutputs)`; the remote
source keeps `prefetch` requests in flight so the teacher computes batch t+k while t trains.
`stream(batches, view=...)` takes the batches' view id (the epoch): the cache sources look rows up
by `(key, view)` and check each hit's digests against the batch's pixels and tokens, so a cache
never serves embeddings of other pixels than the ones being trained on.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from teacher_service.contract.answer_codec import encode_response
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse, RequestError, TeacherUnavailableError
from teacher_service.scores import teacher_scores

from student_trainer.config import TeacherSourceConfig
from student_trainer.data.batches import Batch
from student_trainer.teacher.modes import TeacherMode
from student_trainer.teacher.outputs import EnsembleOutputs, TeacherOutputs, ensemble_fingerprint

log = logging.getLogger(__name__)



@dataclass
class CacheStats:
    """Embedding cache counters (samples): served from the cache, sent to the pool, appended."""

    hits: int = 0
    misses: int = 0
    appends: int = 0
    read_s: float = 0.0  # time spent looking up, reading and checking cached rows
    hits_uncosted: int = 0  # distinct rows used from files that record no teacher seconds (appends, older caches)

    def as_metrics(self) -> dict:
        return {"teacher_cache_hits": self.hits, "teacher_cache_misses": self.misses,
                "teacher_cache_appends": self.appends, "teacher_cache_read_s": round(self.read_s, 4),
                "teacher_cache_hits_uncosted": self.hits_uncosted}


@dataclass
class TeacherStats:
    """Per-worker counters since this worker process started (after a resume: since the resume).

    `requests` / `samples` count real teacher calls only; cache sources add `cache` counters.
    """

    requests: int = 0
    samples: int = 0
    samples_by_reference: int = 0  # answered from references to the shards, not sent pixels
    retries: int = 0
    wait_s: float = 0.0  # time the training loop spent blocked on teacher results
    # teacher-seconds: the teacher compute this worker's answers cost (docs/design.md, per mode):
    # the answers' `compute_s` (inline, remote, hybrid misses) and cache hits' precompute share
    compute_s: float = 0.0
    fingerprints: set = field(default_factory=set)
    cache: CacheStats | None = None

    def as_metrics(self) -> dict:
        metrics = {"teacher_requests": self.requests, "teacher_samples": self.samples,
                   "teacher_samples_by_reference": self.samples_by_reference,
                   "teacher_retries": self.retries, "teacher_wait_s": round(self.wait_s, 4),
                   "teacher_compute_s": round(self.compute_s, 6)}
        if self.cache is not None:
            metrics.update(self.cache.as_metrics())
        return metrics


def make_request(batch: Batch, run: str, view: str = "", weight: float = 1.0, scores: bool = False,
                 answer_dtype: str | None = None) -> EmbedRequest:
    return EmbedRequest(keys=list(batch.keys), images=batch.images, tokens=batch.tokens, run=run, view=view,
                        weight=weight, scores=scores, answer_dtype=answer_dtype)


class TeacherSource:
    """A teacher mode's implementation (`SOURCES`). What it needs and can do are its `mode`'s facts
    (`TeacherMode`), which the loop asks the built source: `can_lose_teacher` (a teacher that may
    stop answering mid-run), `computes_centroids` (can embed Embed-KD centroids)."""

    mode: TeacherMode
    embed_dim: int | None = None
    info: dict = {}
    stats: TeacherStats

    @classmethod
    def from_config(cls, cfg: TeacherSourceConfig, run: str, *, device: str | None = None,
                    recipe: dict | None = None, view_namespace: str = "", scores: bool = False) -> TeacherSource:
        """The source of `cfg`, given what `make_teacher_source` knows; each class takes what it uses
        (`scores`: ask a pool for each batch's per-sample scores, `TeacherOutputs.scores`)."""
        raise NotImplementedError

    @property
    def can_lose_teacher(self) -> bool:
        return self.mode.can_lose_teacher

    @property
    def computes_centroids(self) -> bool:
        return self.mode.computes_centroids

    def stream(self, batches: Iterable[Batch], view: int | None = None, eager: bool = False
               ) -> Iterator[tuple[Batch, TeacherOutputs | None]]:
        """`(batch, outputs)` for each batch, in order. `eager`: a source that asks a pool sends its
        first prefetch window now, not at the first `next()`, so the first answers arrive while the
        caller does other work (builds the model, writes a checkpoint); the others ignore it."""
        raise NotImplementedError


class NoTeacher(TeacherSource):
    """Plain CLIP training: no teacher outputs."""

    mode = TeacherMode.NONE

    def __init__(self) -> None:
        self.stats = TeacherStats()

    @classmethod
    def from_config(cls, cfg: TeacherSourceConfig, run: str, **_: Any) -> NoTeacher:
        return cls()

    def stream(self, batches: Iterable[Batch], view: int | None = None, eager: bool = False
               ) -> Iterator[tuple[Batch, TeacherOutputs | None]]:
        for batch in batches:
            yield batch, None


class InlineTeacher(TeacherSource):
    """The teacher loaded inside the student worker, as OpenCLIP does: the baseline to beat."""

    mode = TeacherMode.INLINE

    @classmethod
    def from_config(cls, cfg: TeacherSourceConfig, run: str, *, device: str | None = None, scores: bool = False,
                    **_: Any) -> InlineTeacher:
        return cls(cfg, run, device, scores)

    def __init__(self, cfg: TeacherSourceConfig, run: str, device: str | None = None, scores: bool = False) -> None:
        from teacher_service.serve.engine import TeacherEngine
        from teacher_service.model import load_teacher

        teacher_cfg = cfg.teacher
        if device is not None and teacher_cfg.device == "auto":
            teacher_cfg = teacher_cfg.updated({"device": device})
        self.engine = TeacherEngine(load_teacher(teacher_cfg))
        self.info = self.engine.teacher.info()
        self.embed_dim = int(self.info["embed_dim"])
        self.run = run
        self.answer_dtype = cfg.answer_dtype or "fp16"
        self.scores = scores  # scored here, as a pool would, from the rows before they are encoded
        self.stats = TeacherStats()

    def stream(self, batches: Iterable[Batch], view: int | None = None, eager: bool = False
               ) -> Iterator[tuple[Batch, TeacherOutputs]]:
        for batch in batches:
            start = time.perf_counter()
            resp = self.engine.embed(make_request(batch, self.run))
            if self.scores:
                resp = replace(resp, scores=teacher_scores(resp.image_features, resp.text_features, resp.logit_scale))
            resp = encode_response(resp, self.answer_dtype)
            self.stats.wait_s += time.perf_counter() - start
            self.stats.requests += 1
            self.stats.samples += len(batch.keys)
            self.stats.compute_s += resp.compute_s
            yield batch, TeacherOutputs.from_response(resp)


class RemoteTeacher(TeacherSource):
    """Teacher embeddings from the named Serve app, with a bounded prefetch window and retries.

    The window is this run's bound on the pool: at most `prefetch + 1` requests per worker are in
    flight; a saturated pool makes `result()` wait longer (Serve queues, never drops). With a
    `view_namespace`, requests carry `view_identity(namespace, view)` so the pool computes a
    sample that other runs (or this run's retries) also ask for only once.

    `cfg.send_pixels` decides whether a batch read from shards (`Batch.origin`) goes as pixels or
    as references the teacher regenerates the views from (`request_for`). With `scores` every
    request also asks for its samples' scores (data selection: `EmbedRequest.scores`).
    """

    mode = TeacherMode.REMOTE

    @classmethod
    def from_config(cls, cfg: TeacherSourceConfig, run: str, *, view_namespace: str = "", scores: bool = False,
                    **_: Any) -> RemoteTeacher:
        return cls(cfg, run, view_namespace, scores)

    def __init__(self, cfg: TeacherSourceConfig, run: str, view_namespace: str = "", scores: bool = False) -> None:
        from teacher_service.app import get_teacher_handle

        self.cfg = cfg
        self.run = run
        self.scores = scores
        self.answer_dtype = cfg.answer_dtype  # None: the pool's default; hybrid sets its cache's
        self.view_namespace = view_namespace if cfg.coalesce else ""
        self.handle = get_teacher_handle(cfg.app_name, timeout_s=cfg.timeout_s)
        self.info = self._call(lambda: self.handle.info.remote(), "info")
        self.embed_dim = int(self.info["embed_dim"])
        self.stats = TeacherStats(fingerprints={self.info["fingerprint"]})  # answers must match info
        self._shards: dict[str, str] = {}  # shard → "" where the teacher reads it, else why not (check_shards)
        self._refs_refused = False  # "auto": the pool refused a request by reference; pixels from then on
        if cfg.send_pixels == "reference" and not self.info.get("by_reference"):
            raise ValueError(f"teacher.send_pixels 'reference': teacher app {cfg.app_name!r} reads no shards; "
                             "deploy it with shard_roots holding the training shards, or use 'auto'")

    def _call(self, submit, what: str):
        """Submit and wait, re-submitting on failure; RequestError (our bug, not theirs) is not retried.

        Gives up only when both budgets are spent: `retries` re-sends and `patience_s` seconds since
        the first failure, so a pool that is redeployed or rescheduled within the patience is
        waited for, however many re-sends that takes.
        """
        last: BaseException | None = None
        first_failure: float | None = None
        for attempt in itertools.count():
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
                first_failure = time.monotonic() if first_failure is None else first_failure
                waited = time.monotonic() - first_failure
                if attempt >= self.cfg.retries and waited >= self.cfg.patience_s:
                    break
                if hasattr(self, "stats"):
                    self.stats.retries += 1
                log.warning("teacher %s call failed (%s); retry %d (%.0f s of %.0f s patience)", what, exc,
                            attempt + 1, waited, self.cfg.patience_s)
                time.sleep(min(2.0 ** attempt, 10.0))
        raise TeacherUnavailableError(
            f"teacher app {self.cfg.app_name!r} did not answer its {what} call in {attempt + 1} attempts "
            f"(timeout {self.cfg.timeout_s:.0f} s each) over {waited:.0f} s (patience {self.cfg.patience_s:.0f} s): "
            f"{last!r}. Is it deployed? (`kd teacher serve` / `kd teacher status`)"
        ) from last

    def stream(self, batches: Iterable[Batch], view: int | None = None, eager: bool = False
               ) -> Iterator[tuple[Batch, TeacherOutputs]]:
        """`eager`: the first window's requests go out now, not at the first `next()` (`stream_parts`)."""
        return ((batch, outputs) for batch, outputs in
                self.stream_parts(((batch, batch) for batch in batches), view, eager=eager))

    def view_id(self, view: int | None) -> str:
        """The requests' view identity; empty (no coalescing) without a namespace or a view id."""
        from teacher_service.contract.augment import view_identity

        return view_identity(self.view_namespace, view) if self.view_namespace and view is not None else ""

    def stream_parts(self, items: Iterable[tuple[Any, Batch | None]], view: int | None = None,
                     eager: bool = False, scored: Callable[[Any], bool] | None = None
                     ) -> Iterator[tuple[Any, TeacherOutputs | None]]:
        """`(tag, batch)` items → `(tag, outputs)` in order; a None (or empty) batch asks nothing.

        The prefetch window spans items, so while item t trains the requests of items
        t+1 .. t+prefetch are in flight. The hybrid source sends only its cache misses this way.
        `eager` submits the first window before returning, so an ensemble (`MultiTeacher`) has every
        pool computing its first batches before it waits on any of them. With `self.scores`, an
        item's request asks for scores where `scored(tag)` (None: every item's).
        """
        window: collections.deque = collections.deque()
        iterator = iter(items)
        view_id = self.view_id(view)

        def submit_next() -> bool:
            item = next(iterator, None)
            if item is None:
                return False
            tag, batch = item
            if batch is None or len(batch) == 0:
                window.append((tag, None, None, None))
                return True
            request = self.request_for(batch, view_id, self.scores and (scored is None or scored(tag)))
            window.append((tag, batch, request, self.handle.embed.remote(request)))
            self.stats.requests += 1
            self.stats.samples += len(batch.keys)
            return True

        def fill() -> None:
            # While item t trains, the requests for t+1 .. t+prefetch are in flight.
            while len(window) <= self.cfg.prefetch and submit_next():
                pass

        def drain() -> Iterator[tuple[Any, TeacherOutputs | None]]:
            while True:
                fill()
                if not window:
                    return
                tag, batch, request, pending = window.popleft()
                if batch is None:
                    yield tag, None
                    continue
                start = time.perf_counter()
                resp = self._answer(batch, request, pending)
                self.stats.wait_s += time.perf_counter() - start
                self.stats.compute_s += getattr(resp, "compute_s", 0.0)  # 0 from a pool older than the field
                self._check(resp, batch)
                yield tag, TeacherOutputs.from_response(resp)

        if eager:
            fill()
        return drain()

    def request_for(self, batch: Batch, view_id: str = "", scores: bool = False) -> EmbedRequest:
        """The batch's request: by reference where `send_pixels` and the teacher allow, else pixels."""
        if not self._by_reference(batch):
            return make_request(batch, self.run, view_id, self.cfg.weight, scores, self.answer_dtype)
        from teacher_service.contract.augment import image_refs

        origin = batch.origin
        refs = image_refs(batch.images, [os.path.abspath(p) for p in origin.shards], origin.view, origin.recipe)
        return EmbedRequest(keys=list(batch.keys), tokens=batch.tokens, run=self.run, view=view_id,
                            weight=self.cfg.weight, image_refs=refs, scores=scores, answer_dtype=self.answer_dtype)

    def _by_reference(self, batch: Batch) -> bool:
        mode = self.cfg.send_pixels
        if mode == "always" or (mode == "auto" and (self._refs_refused or not self.info.get("by_reference"))):
            return False
        if batch.origin is None:
            if mode == "reference":
                raise ValueError("teacher.send_pixels 'reference': a batch without its shard origin (Batch.origin)")
            return False
        return mode == "reference" or self._teacher_reads(batch.origin.shards)

    def _teacher_reads(self, shards: list[str]) -> bool:
        """Whether the pool can read every one of `shards` (asked once per shard, with its size)."""
        paths = sorted({os.path.abspath(p) for p in shards})
        unknown = [p for p in paths if p not in self._shards]
        if unknown:
            sizes = [_file_size(p) for p in unknown]
            answer = self._call(lambda: self.handle.check_shards.remote(unknown, sizes), "check_shards")
            for path in unknown:
                self._shards[path] = answer.get(path, "no answer")
                if self._shards[path]:
                    log.info("teacher cannot read shard %s (%s): its samples go as pixels", path, self._shards[path])
        return not any(self._shards[p] for p in paths)

    def _answer(self, batch: Batch, request: EmbedRequest, pending) -> EmbedResponse:
        """The response to `request` (already submitted as `pending`). Under "auto", a request by
        reference the pool refuses is re-sent as pixels, and so is every later batch."""
        first = [pending]
        try:
            resp = self._call(lambda: first.pop() if first else self.handle.embed.remote(request), "embed")
        except Exception as exc:
            if request.image_refs is None or self.cfg.send_pixels != "auto" or not _is_request_error(exc):
                raise
            log.warning("teacher refused a request by reference, sending pixels from now on: %s", exc)
            self._refs_refused = True
            pixels = make_request(batch, self.run, request.view, self.cfg.weight, request.scores,
                                  request.answer_dtype)
            return self._call(lambda: self.handle.embed.remote(pixels), "embed")
        if request.image_refs is not None:
            self.stats.samples_by_reference += len(batch)
        return resp

    def _check(self, resp: EmbedResponse, batch: Batch) -> None:
        if list(resp.keys) != list(batch.keys):
            raise RuntimeError("teacher answered for other sample keys than were sent")
        self.stats.fingerprints.add(resp.fingerprint)
        if len(self.stats.fingerprints) > 1:
            raise RuntimeError(
                f"teacher fingerprint changed during the run: {sorted(self.stats.fingerprints)}; "
                "the teacher app was redeployed with other weights"
            )


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _cancel(pending) -> None:
    try:
        if pending is not None:
            pending.cancel()
    except Exception:  # cancelling is best effort: the replica may already be gone
        pass


def _is_request_error(exc: BaseException) -> bool:
    cause = getattr(exc, "cause", None) or exc.__cause__
    return isinstance(cause, RequestError) or "RequestError" in type(exc).__name__


# ---------------------------------------------------------------------------------------------
# embedding cache sources


@dataclass
class _Plan:
    """One batch split into cache hits (already read and checked) and misses (for the pool)."""

    batch: Batch
    view: int
    hit_rows: np.ndarray
    miss_rows: np.ndarray
    hits: dict  # cached rows for hit_rows (image_emb, text_emb, digests)
    image_digest: np.ndarray
    text_digest: np.ndarray

    @property
    def miss_batch(self) -> Batch | None:
        return self.batch.take(self.miss_rows) if self.miss_rows.size else None


class _CacheSource(TeacherSource):
    """What the cache and hybrid sources share: view ids, lookups with digest checks, assembly."""

    cache: Any
    stats: TeacherStats

    def _init_views(self, verify_rows: int | None = 8) -> None:
        self._streams = 0
        self._warned = False
        self._used_rows: dict[int, np.ndarray] = {}  # per segment, the rows already charged (`_charge`)
        self.verify_rows = verify_rows
        self._verify_rng = np.random.default_rng(0)

    def _view(self, view: int | None) -> int:
        """The batches' view id; without one, the number of earlier stream() calls (the epoch of a fresh run)."""
        if view is None:
            view = self._streams
            if not self._warned:
                log.warning("teacher source %s: stream() got no view id; assuming view %d (the epoch of a "
                            "run that started at epoch 0). Pass view=epoch.", type(self).__name__, view)
                self._warned = True
        self._streams += 1
        return int(view)

    def _plan(self, batch: Batch, view: int) -> _Plan:
        """Look the batch up; check a sample of the hits' digests; digest the misses (to append them).

        Hashing every 224 px view would cost ~25 ms per 256-sample batch, so only `verify_rows`
        random hits per batch are checked (None: all): a wrong view, seed, size or tokenizer
        changes every row, so a handful per batch catches it at once.
        """
        start = time.perf_counter()
        cache = self.cache
        locs = cache.locate(list(batch.keys), view)
        hit_rows = np.asarray([i for i, loc in enumerate(locs) if loc is not None], dtype=np.int64)
        miss_rows = np.asarray([i for i, loc in enumerate(locs) if loc is None], dtype=np.int64)
        hits = cache.fetch([locs[i] for i in hit_rows]) if hit_rows.size else {}
        checked = self._verify_positions(hit_rows.size)
        idig, tdig = self._digests(batch, np.concatenate([hit_rows[checked], miss_rows]))
        if checked.size:
            self._check_digests(batch, view, hit_rows[checked], {k: hits[k][checked] for k in
                                                                 ("image_digest", "text_digest")}, idig, tdig)
        self.stats.cache.hits += int(hit_rows.size)
        self.stats.cache.misses += int(miss_rows.size)
        self._charge([locs[i] for i in hit_rows])
        self.stats.cache.read_s += time.perf_counter() - start
        return _Plan(batch, view, hit_rows, miss_rows, hits, idig, tdig)

    def _charge(self, locs: list[tuple[int, int]]) -> None:
        """Add to the teacher-seconds what the cached rows at `locs` cost to compute, each row once
        per worker (a row reused in a later epoch cost the teacher nothing more); rows of files that
        record no cost are counted as uncosted hits instead."""
        by_segment: dict[int, list[int]] = {}
        for seg, row in locs:
            by_segment.setdefault(seg, []).append(row)
        for seg, rows in by_segment.items():
            used = self._used_rows.setdefault(seg, np.zeros(len(self.cache.segments[seg].image_digest), bool))
            new = np.unique(np.asarray(rows, np.int64))
            new = new[~used[new]]
            used[new] = True
            cost = self.cache.teacher_s(seg)
            if cost is None:
                self.stats.cache.hits_uncosted += int(new.size)
            else:
                self.stats.compute_s += cost * new.size

    def _verify_positions(self, n: int) -> np.ndarray:
        if self.verify_rows is None or n <= self.verify_rows:
            return np.arange(n, dtype=np.int64)
        return np.sort(self._verify_rng.choice(n, size=self.verify_rows, replace=False))

    def _digests(self, batch: Batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint64 image and token digests of `rows` of the batch (zeros elsewhere)."""
        from teacher_service.contract.augment import image_digests, token_digests

        idig = np.zeros(len(batch), np.uint64)
        tdig = np.zeros(len(batch), np.uint64)
        if rows.size:
            idig[rows] = image_digests(batch.images[rows])
            tdig[rows] = token_digests(batch.tokens[rows], int(self.cache.meta["teacher"]["context_length"]))
        return idig, tdig

    def _check_digests(self, batch: Batch, view: int, rows: np.ndarray, hits: dict, idig: np.ndarray,
                       tdig: np.ndarray) -> None:
        from teacher_service.cache.store import CacheMismatchError

        bad_image = np.flatnonzero(hits["image_digest"] != idig[rows])
        if bad_image.size:
            key = batch.keys[rows[bad_image[0]]]
            raise CacheMismatchError(
                f"embedding cache {self.cache.path}: the cached view {view} of sample {key!r} "
                f"({bad_image.size} of {rows.size} hits in this batch) was embedded from other pixels than "
                f"this run trains on. The cache's view recipe is {self.cache.recipe}; check the run's "
                f"data.image_size and seed, and that stream() gets view=epoch (a resumed run must pass it)")
        bad_text = np.flatnonzero(hits["text_digest"] != tdig[rows])
        if bad_text.size:
            key = batch.keys[rows[bad_text[0]]]
            raise CacheMismatchError(
                f"embedding cache {self.cache.path}: the cached text embedding of sample {key!r} "
                f"({bad_text.size} of {rows.size} hits) was computed from other tokens than this run sends "
                f"(cache tokenizer {self.cache.recipe.get('tokenizer')!r}, context length "
                f"{self.cache.recipe.get('context_length')!r}): a caption longer than the student's context?")

    def _outputs(self, plan: _Plan, missed: TeacherOutputs | None = None) -> TeacherOutputs:
        n, dim = len(plan.batch), self.cache.embed_dim
        parts = [plan.hits["image_emb"]] if plan.hit_rows.size else []
        parts += [missed.image_features] if plan.miss_rows.size else []
        floats = np.result_type(*parts) if parts else np.float16  # fp16 rows stay float16, decoded ones float32
        image = np.empty((n, dim), floats)
        text = np.empty((n, dim), floats)
        if plan.hit_rows.size:
            image[plan.hit_rows] = plan.hits["image_emb"]
            text[plan.hit_rows] = plan.hits["text_emb"]
        if plan.miss_rows.size:
            image[plan.miss_rows] = missed.image_features
            text[plan.miss_rows] = missed.text_features
        teacher = self.cache.meta["teacher"]
        bias = teacher.get("logit_bias")
        scores = missed.scores if missed is not None and not plan.hit_rows.size else None  # the pool saw it all
        return TeacherOutputs(image, text, float(teacher["logit_scale"]), None if bias is None else float(bias),
                              self.cache.fingerprint, scores=scores)

    def centroids(self):
        """The Embed-KD centroids `kd precompute --class-centroids` wrote beside the rows (float32
        [C, D_t]), or None; centroids of another teacher are refused (CacheMismatchError)."""
        from teacher_service.cache.store import CENTROIDS_FILE, read_centroids

        path = os.path.join(self.cache.path, CENTROIDS_FILE)
        return read_centroids(path, fingerprint=self.cache.fingerprint)[0] if os.path.isfile(path) else None


class CachedTeacher(_CacheSource):
    """`cache` mode: every teacher output from a precomputed cache; no teacher runs, none is loaded.

    It reads one teacher's rows: the cache root's only teacher, or `cfg.cache_teacher` (a
    fingerprint or model name) of a root holding several.

    A missing `(key, view)` stops the run (CacheMissError naming the sample, the view and the
    cache) rather than training without targets.
    """

    mode = TeacherMode.CACHE

    @classmethod
    def from_config(cls, cfg: TeacherSourceConfig, run: str, *, recipe: dict | None = None, **_: Any
                    ) -> CachedTeacher:
        return cls(cfg, run, recipe)

    def __init__(self, cfg: TeacherSourceConfig, run: str, recipe: dict | None = None,
                 verify_rows: int | None = 8) -> None:
        from teacher_service.cache.store import EmbeddingCache

        if not cfg.cache_path:
            raise ValueError("teacher.mode 'cache' needs teacher.cache_path")
        self.cache = EmbeddingCache.open(cfg.cache_path, recipe=recipe, teacher=cfg.cache_teacher)
        self.info = self.cache.teacher_info
        self.embed_dim = self.cache.embed_dim
        self.run = run
        self.stats = TeacherStats(fingerprints={self.cache.fingerprint}, cache=CacheStats())
        self._init_views(verify_rows)

    def stream(self, batches: Iterable[Batch], view: int | None = None, eager: bool = False
               ) -> Iterator[tuple[Batch, TeacherOutputs]]:
        from teacher_service.cache.store import CacheMissError

        view = self._view(view)
        for batch in batches:
            plan = self._plan(batch, view)
            if plan.miss_rows.size:
                key = batch.keys[plan.miss_rows[0]]
                raise CacheMissError(
                    f"embedding cache {self.cache.path} has no view {view} of sample {key!r} "
                    f"({plan.miss_rows.size} of {len(batch)} samples of this batch missing; views cached for "
                    f"it: {self.cache.views_of(key)}). Precompute more views (`kd precompute --views "
                    f"{view + 1}`) over these shards, or train with teacher.mode 'hybrid'")
            yield batch, self._outputs(plan)


class HybridTeacher(_CacheSource):
    """`hybrid` mode: hits from the cache, misses from the Serve pool, misses appended to the cache.

    Misses go through `RemoteTeacher` (same prefetch window, retries and fingerprint checks);
    their results join the in-memory index at once (so later batches, epochs with the same view,
    or a rerun find them) and are written as a new `append-<run>-<rank>-<uuid>.parquet` every
    `flush_every` batches and at the end of each stream (epoch). The app's fingerprint picks its rows
    in the cache root (a teacher new to the root gets its own directory); a one-teacher cache of the
    old layout holding another teacher is refused when the source starts.
    """

    mode = TeacherMode.HYBRID

    @classmethod
    def from_config(cls, cfg: TeacherSourceConfig, run: str, *, recipe: dict | None = None,
                    view_namespace: str = "", scores: bool = False, **_: Any) -> HybridTeacher:
        return cls(cfg, run, recipe, view_namespace=view_namespace, scores=scores)

    def __init__(self, cfg: TeacherSourceConfig, run: str, recipe: dict | None = None,
                 flush_every: int = 50, verify_rows: int | None = 8, view_namespace: str = "",
                 scores: bool = False) -> None:
        from teacher_service.cache.store import CacheAppender, EmbeddingCache

        if not cfg.cache_path:
            raise ValueError("teacher.mode 'hybrid' needs teacher.cache_path")
        self.remote = RemoteTeacher(cfg, run, view_namespace, scores)
        self.info = self.remote.info
        self.embed_dim = self.remote.embed_dim
        self.cache = EmbeddingCache.open(cfg.cache_path, teacher_info=self.info, recipe=recipe, create=True,
                                         answer_dtype=cfg.answer_dtype, start_dtype=self.info.get("answer_dtype"))
        self.remote.answer_dtype = self.cache.answer_dtype  # misses are asked, kept and appended in it
        self.appender = CacheAppender(self.cache.path, self.cache.meta, run=run,
                                      rank=int(os.environ.get("RANK", "0") or 0))
        self.stats = self.remote.stats
        self.stats.cache = CacheStats()
        self.flush_every = max(1, int(flush_every))
        self._init_views(verify_rows)

    def stream(self, batches: Iterable[Batch], view: int | None = None, eager: bool = False
               ) -> Iterator[tuple[Batch, TeacherOutputs]]:
        """`eager`: the first window's misses go to the pool now (their batches are looked up now)."""
        view = self._view(view)
        self.cache.refresh()  # rows other runs appended since we opened the cache
        # the pool scores a batch only when it sees all of it: a batch with cache hits is scored by
        # the run from the assembled rows (`student_trainer.selection`), with the same function
        parts = self.remote.stream_parts(self._plans(batches, view), view, eager=eager,
                                         scored=lambda plan: plan.hit_rows.size == 0)
        return self._answers(parts)

    def _plans(self, batches: Iterable[Batch], view: int) -> Iterator[tuple[_Plan, Batch | None]]:
        for batch in batches:
            plan = self._plan(batch, view)
            yield plan, plan.miss_batch

    def _answers(self, parts: Iterator[tuple[_Plan, TeacherOutputs | None]]
                 ) -> Iterator[tuple[Batch, TeacherOutputs]]:
        try:
            for i, (plan, missed) in enumerate(parts):
                if missed is not None:
                    self._record(plan, missed)
                yield plan.batch, self._outputs(plan, missed)
                if (i + 1) % self.flush_every == 0:
                    self.flush()
        finally:
            self.flush()

    def _record(self, plan: _Plan, missed: TeacherOutputs) -> None:
        rows = plan.miss_rows
        keys = [plan.batch.keys[i] for i in rows]
        args = (missed.image_features, missed.text_features, plan.image_digest[rows], plan.text_digest[rows])
        fresh = np.asarray(self.cache.add(keys, plan.view, *args), dtype=bool)
        if fresh.any():  # a key already answered earlier in the prefetch window is not appended twice
            self.appender.add([k for k, f in zip(keys, fresh) if f], plan.view, *(a[fresh] for a in args))
            self.stats.cache.appends += int(fresh.sum())

    def flush(self) -> str | None:
        """Write the buffered misses to a new append file now (also done every flush_every batches)."""
        return self.appender.flush()


# The one registry of teacher modes' implementations: every TeacherMode has exactly one class here.
SOURCES: dict[TeacherMode, type[TeacherSource]] = {
    cls.mode: cls for cls in (NoTeacher, InlineTeacher, RemoteTeacher, CachedTeacher, HybridTeacher)}


def source_class(mode: str | TeacherMode) -> type[TeacherSource]:
    """The source class that implements a teacher mode (ValueError naming the valid modes)."""
    return SOURCES[TeacherMode.parse(mode, "teacher mode")]


# ---------------------------------------------------------------------------------------------
# several teachers at once


class EnsembleStats:
    """An ensemble's counters: the teachers' summed (the keys a single teacher reports) and each
    teacher's requests, samples and wait under `teacher_<name>_*`."""

    def __init__(self, names: list[str], members: list[TeacherStats]) -> None:
        self.names, self.members = names, members

    @property
    def fingerprints(self) -> set:
        return set().union(*(m.fingerprints for m in self.members))

    @property
    def wait_s(self) -> float:
        """Time the loop spent blocked on any teacher (the members wait one after another)."""
        return sum(m.wait_s for m in self.members)

    @property
    def compute_s(self) -> float:
        """Teacher-seconds of every teacher together."""
        return sum(m.compute_s for m in self.members)

    def as_metrics(self) -> dict:
        metrics: dict = {}
        for name, stats in zip(self.names, self.members):
            own = stats.as_metrics()
            for key, value in own.items():
                metrics[key] = round(metrics.get(key, 0) + value, 4)
            for key in ("requests", "samples", "wait_s", "compute_s"):
                metrics[f"teacher_{name}_{key}"] = own[f"teacher_{key}"]
        return metrics


class MultiTeacher(TeacherSource):
    """Several teachers at once (an ensemble): each batch goes to every teacher's own source, and
    the loop gets one `TeacherOutputs` per teacher (`EnsembleOutputs`, own width, scale and bias).

    Each teacher keeps what its source does alone: the remote ones their prefetch window (so every
    pool has its next batches in flight while one trains), retries and patience; a teacher lost for
    good stops the run as a single one would. A teacher with `labels` is asked only for the samples
    of those classes, and a sample whose metadata names teachers (`teacher` in its JSON) only those
    (per-sample teacher choice); its outputs are spread back over the batch with
    `answered` marking its rows, and a batch with none of them does not reach it.
    """

    mode = "ensemble"  # not a TeacherMode: each member has its own
    computes_centroids = False  # Embed-KD centroids come from one teacher; preflight refuses an ensemble

    def __init__(self, configs: list[TeacherSourceConfig], sources: list[TeacherSource]) -> None:
        self.configs, self.sources = configs, sources
        self.names = [c.name for c in configs]
        self.weights = [float(c.loss_weight) for c in configs]
        self.labels = [None if c.labels is None else np.asarray(c.labels, dtype=np.int64) for c in configs]
        self.embed_dims = [int(src.embed_dim) for src in sources]
        teachers = [{"name": n, **src.info} for n, src in zip(self.names, sources)]
        self.info = {"fingerprint": ensemble_fingerprint({t["name"]: t.get("fingerprint", "") for t in teachers}),
                     "model": "+".join(str(t.get("model")) for t in teachers), "teachers": teachers}
        self.stats = EnsembleStats(self.names, [src.stats for src in sources])

    @property
    def can_lose_teacher(self) -> bool:
        """Whether any member can: one teacher lost for good stops the run as a single one would."""
        return any(src.can_lose_teacher for src in self.sources)

    def rows_for(self, batch: Batch, i: int) -> np.ndarray | None:
        """The rows of `batch` teacher i answers (None: all of them). A sample whose metadata names
        teachers (`Batch.teachers`) goes to those; any other to the teachers whose `labels` hold its
        label, and to those without labels."""
        if batch.teachers is None:
            return None if self.labels[i] is None else np.flatnonzero(np.isin(batch.labels, self.labels[i]))
        name = self.names[i]
        by_label = np.ones(len(batch), bool) if self.labels[i] is None else np.isin(batch.labels, self.labels[i])
        chosen = [name in pick if pick is not None else bool(own) for pick, own in zip(batch.teachers, by_label)]
        rows = np.flatnonzero(chosen)
        return None if rows.size == len(batch) else rows

    def _routed(self, batches: Iterable[Batch], i: int) -> Iterator[Batch]:
        """Teacher i's share of each batch; batches with none of its rows are left out."""
        for batch in batches:
            rows = self.rows_for(batch, i)
            if rows is None:
                yield batch
            elif rows.size:
                yield batch.take(rows)

    def _unanswered(self, i: int, size: int) -> TeacherOutputs:
        """Teacher i's outputs for a batch it was not asked about: zeros, no row answered."""
        info, dim = self.sources[i].info, self.embed_dims[i]
        bias = info.get("logit_bias")
        zeros = np.zeros((size, dim), np.float16)
        return TeacherOutputs(zeros, zeros.copy(), float(info.get("logit_scale") or 1.0),
                              None if bias is None else float(bias), info.get("fingerprint", ""),
                              answered=np.zeros(size, bool))

    def stream(self, batches: Iterable[Batch], view: int | None = None, eager: bool = False
               ) -> Iterator[tuple[Batch, EnsembleOutputs]]:
        """Every member's stream opens eagerly, so every pool computes before any is waited on;
        `eager` opens them now, else at the first `next()`."""
        return self._joined(batches, view) if eager else self._joined_at_first_next(batches, view)

    def _joined_at_first_next(self, batches: Iterable[Batch], view: int | None
                              ) -> Iterator[tuple[Batch, EnsembleOutputs]]:
        yield from self._joined(batches, view)  # closing this closes the members' streams

    def _joined(self, batches: Iterable[Batch], view: int | None) -> Iterator[tuple[Batch, EnsembleOutputs]]:
        copies = itertools.tee(batches, len(self.sources) + 1)
        streams = [src.stream(self._routed(copies[i + 1], i), view=view, eager=True)
                   for i, src in enumerate(self.sources)]
        return self._zipped(copies[0], streams)

    def _zipped(self, batches: Iterable[Batch], streams: list[Iterator]) -> Iterator[tuple[Batch, EnsembleOutputs]]:
        try:
            for batch in batches:
                yield batch, EnsembleOutputs(tuple(self._answer(batch, i, s) for i, s in enumerate(streams)),
                                             tuple(self.names), tuple(self.weights))
        finally:
            for stream in streams:
                stream.close()  # a hybrid teacher flushes its appended misses

    def _answer(self, batch: Batch, i: int, stream: Iterator) -> TeacherOutputs:
        rows = self.rows_for(batch, i)
        if rows is not None and rows.size == 0:
            return self._unanswered(i, len(batch))
        asked, outputs = next(stream)
        if rows is None:  # a mask on every teacher of every batch: all ranks then gather the same tensors
            return replace(outputs, answered=np.ones(len(batch), bool))
        if list(asked.keys) != [batch.keys[r] for r in rows]:
            raise RuntimeError(f"teacher {self.names[i]!r} answered another batch than the one training")
        return outputs.spread(rows, len(batch))


def make_teacher_source(cfg: TeacherSourceConfig, run: str, device: str | None = None,
                        recipe: dict | None = None, view_namespace: str = "", scores: bool = False) -> TeacherSource:
    """The teacher source for `cfg.mode`, or a `MultiTeacher` over `cfg.sources` when it lists
    several. `recipe` (`teacher_service.contract.augment.view_recipe(image_size, seed)`) lets the
    cache modes refuse a cache built for other views before the first batch; `view_namespace`
    (`teacher_service.contract.augment.view_namespace`) lets the pool coalesce the remote and
    hybrid sources' requests with other runs'; `scores` has the pools score each batch they answer
    whole (data selection)."""
    members = cfg.members()
    sources = [source_class(m.mode).from_config(m, run, device=device, recipe=recipe, view_namespace=view_namespace,
                                                scores=scores)
               for m in members]
    return MultiTeacher(members, sources) if cfg.is_ensemble else sources[0]
