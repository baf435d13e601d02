"""Exactly-once teacher computation inside one replica: coalescing identical samples across runs.

Several student runs over the same data ask the teacher for the same samples — a sweep of loss
weights, or runs restarted from a checkpoint. A request that opts in (a non-empty
`EmbedRequest.view`) has each sample computed once: a sample already in a queued or running
forward waits for that forward ("coalesced"), and one answered recently is answered from a
bounded in-memory table of recent rows ("from cache"). Only the remaining samples go to the
batcher, as one smaller request.

What identifies a sample is what the teacher computes on, digested here by the replica from the
request itself (`sample_identities`): the teacher's fingerprint, the SHA-256 of the exact pixels
(shape included) and of the token row after fitting it to the teacher's context length. View and
keys are the caller's word and are never trusted: they only route (`routing`) and label. So a
caller that sends another run's view and keys with other pixels gets its own pixels' answer and
cannot plant rows in anyone else's, and runs whose keys differ but whose pixels agree share one
forward. The full 256-bit digest (no truncation) makes a crafted collision infeasible even with
unlimited offline search; see docs/reliability.md for the choice.

Shared forwards are independent tasks: a caller that gives up (timeout, retry) does not cancel a
computation others wait on, and its retry joins the computation still running.
"""
from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from teacher_service.contract.augment import image_sha256, token_sha256
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse

Compute = Callable[[EmbedRequest], Awaitable[EmbedResponse]]
Identity = tuple[str, bytes | None, bytes | None]  # (teacher fingerprint, pixels sha256, fitted tokens sha256)


@dataclass
class Reuse:
    """How one request's samples were answered."""

    computed: int = 0   # sent to the teacher by this request
    coalesced: int = 0  # joined a forward another request (or an earlier row of this one) started
    from_cache: int = 0  # answered from the replica's table of recent rows
    batch: bytes = b""  # `batch_identity` of the request's samples (empty: not coalesced, never digested)


@dataclass
class _Pending:
    task: asyncio.Future  # the EmbedResponse of the sub-request that computes this row
    row: int


class Coalescer:
    """Routes each sample of a request to: the recent-rows table, a running forward, or a new one.

    `memory_rows` bounds the recent-rows table (least recently used rows go first); 0 keeps only
    in-flight coalescing. `fingerprint` and `context_length` are the teacher's: they enter every
    sample's identity. `digest_executor`, when given, hashes there instead of on the event loop
    (hashlib releases the GIL on large buffers, so a replica keeps admitting requests meanwhile).
    `logit_scale` / `logit_bias` fill the response when every row came from the table.
    """

    def __init__(self, memory_rows: int, logit_scale: float, logit_bias: float | None, fingerprint: str,
                 context_length: int, digest_executor: Executor | None = None):
        if memory_rows < 0:
            raise ValueError(f"Coalescer: memory_rows={memory_rows} must be >= 0")
        self.memory_rows = memory_rows
        self.logit_scale, self.logit_bias, self.fingerprint = logit_scale, logit_bias, fingerprint
        self.context_length = context_length
        self._digest_executor = digest_executor
        self._pending: dict[Identity, _Pending] = {}
        self._recent: OrderedDict[Identity, tuple[np.ndarray | None, np.ndarray | None]] = OrderedDict()

    def in_flight_rows(self) -> int:
        return len(self._pending)

    def recent_rows(self) -> int:
        return len(self._recent)

    async def embed(self, request: EmbedRequest, compute: Compute,
                    image_digests: list[bytes] | None = None) -> tuple[EmbedResponse, Reuse]:
        """Answer `request` (already validated), computing only samples nobody has or is computing.

        `image_digests`: `image_sha256(request.images)` when the replica has already computed it
        (the check of a request by reference), so the pixels are hashed once. Only the replica's
        own code passes them; nothing a caller sends reaches this argument."""
        if not request.view:
            return await compute(request), Reuse(computed=len(request))
        ids = await self._identities(request, image_digests)
        sources, fresh = self._route(ids)  # no await from here to _start: lookups and claims are atomic
        own = self._start(request, ids, fresh, compute) if fresh else None
        tasks = {id(p.task): p.task for kind, p in sources if kind == "pending"}
        if own is not None:
            tasks[id(own)] = own
        answers = {k: await asyncio.shield(t) for k, t in tasks.items()}  # shared: never cancel others' work
        reuse = Reuse(computed=len(fresh),
                      coalesced=sum(kind in ("pending", "same") for kind, _ in sources),
                      from_cache=sum(kind == "recent" for kind, _ in sources), batch=batch_identity(ids))
        return self._assemble(request, sources, answers, own), reuse

    # ---- internals
    async def _identities(self, request: EmbedRequest, image_digests: list[bytes] | None) -> list[Identity]:
        if self._digest_executor is None:
            return sample_identities(request, self.fingerprint, self.context_length, image_digests)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._digest_executor, sample_identities, request, self.fingerprint,
                                          self.context_length, image_digests)

    def _route(self, ids: list[Identity]) -> tuple[list[tuple[str, object]], list[int]]:
        """Each sample's source (recent row, pending forward, an earlier row of this request, or
        fresh) and the rows that need a forward of their own."""
        sources: list[tuple[str, object]] = []
        fresh: list[int] = []
        first_in_request: dict[Identity, int] = {}
        for i, ident in enumerate(ids):
            if ident in self._recent:
                self._recent.move_to_end(ident)
                sources.append(("recent", self._recent[ident]))
            elif ident in self._pending:
                sources.append(("pending", self._pending[ident]))
            elif ident in first_in_request:
                sources.append(("same", first_in_request[ident]))
            else:
                first_in_request[ident] = i
                sources.append(("fresh", len(fresh)))
                fresh.append(i)
        return sources, fresh

    def _start(self, request: EmbedRequest, ids: list, rows: list[int], compute: Compute) -> asyncio.Future:
        task = asyncio.ensure_future(compute(subset(request, rows)))
        mine = [ids[i] for i in rows]
        for j, ident in enumerate(mine):
            self._pending[ident] = _Pending(task, j)
        task.add_done_callback(lambda t: self._settle(t, mine))
        return task

    def _settle(self, task: asyncio.Future, idents: list) -> None:
        """A forward ended: its rows leave the in-flight table and, if it succeeded, join the recent table."""
        for ident in idents:
            if ident in self._pending and self._pending[ident].task is task:
                del self._pending[ident]
        if task.cancelled() or task.exception() is not None or self.memory_rows == 0:
            return
        resp = task.result()
        for j, ident in enumerate(idents):
            self._recent[ident] = (_row(resp.image_features, j), _row(resp.text_features, j))
            self._recent.move_to_end(ident)
        while len(self._recent) > self.memory_rows:
            self._recent.popitem(last=False)

    def _assemble(self, request: EmbedRequest, sources: list, answers: dict, own) -> EmbedResponse:
        rows: list[tuple[np.ndarray | None, np.ndarray | None]] = []
        for kind, src in sources:
            if kind == "recent":
                rows.append(src)
            elif kind == "pending":
                rows.append(_rows_of(answers[id(src.task)], src.row))
            elif kind == "same":
                rows.append(rows[src])
            else:
                rows.append(_rows_of(answers[id(own)], src))
        any_resp = next(iter(answers.values()), None)
        return EmbedResponse(
            keys=list(request.keys),
            image_features=_stack([r[0] for r in rows]) if request.images is not None else None,
            text_features=_stack([r[1] for r in rows]) if request.tokens is not None else None,
            logit_scale=any_resp.logit_scale if any_resp else self.logit_scale,
            logit_bias=any_resp.logit_bias if any_resp else self.logit_bias,
            fingerprint=any_resp.fingerprint if any_resp else self.fingerprint,
            compute_s=getattr(answers.get(id(own)), "compute_s", 0.0))  # only the rows this request computed


def sample_identities(request: EmbedRequest, fingerprint: str, context_length: int,
                      image_digests: list[bytes] | None = None) -> list[Identity]:
    """One identity per sample, from what the teacher computes on and nothing the caller declares:
    (fingerprint, SHA-256 of shape + pixels or None, SHA-256 of the fitted token row or None).
    `image_digests`, the replica's own `image_sha256(request.images)`, saves hashing them again."""
    n = len(request)
    if image_digests is not None and (request.images is None or len(image_digests) != n):
        raise ValueError(f"sample_identities: {len(image_digests)} image digests for {n} samples "
                         f"({'no' if request.images is None else 'with'} images)")
    images = [None] * n if request.images is None else (image_digests or image_sha256(request.images))
    tokens = [None] * n if request.tokens is None else token_sha256(request.tokens, context_length)
    return [(fingerprint, image, text) for image, text in zip(images, tokens)]


def batch_identity(ids: list[Identity]) -> bytes:
    """One SHA-256 over a request's sample identities in order: what names its rows' scores in a
    replica's `scores.ScoreMemo` (content, like every identity here, never the caller's keys)."""
    h = hashlib.sha256()
    for fingerprint, image, text in ids:
        h.update(fingerprint.encode("utf-8") + b"\0" + (image or b"-") + b"\0" + (text or b"-") + b"\1")
    return h.digest()


def subset(request: EmbedRequest, rows: list[int]) -> EmbedRequest:
    """The request restricted to `rows` (the whole request when it is every row)."""
    if len(rows) == len(request):
        return request
    idx = np.asarray(rows, dtype=np.int64)
    return EmbedRequest(keys=[request.keys[i] for i in rows],
                        images=None if request.images is None else request.images[idx],
                        tokens=None if request.tokens is None else request.tokens[idx],
                        run=request.run, view=request.view, weight=request.weight)


def _row(features: np.ndarray | None, j: int) -> np.ndarray | None:
    return None if features is None else features[j]


def _rows_of(resp, j: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    if isinstance(resp, Exception):  # the forward refused or failed: every waiter gets its error
        raise resp
    return _row(resp.image_features, j), _row(resp.text_features, j)


def _stack(rows: list[np.ndarray | None]) -> np.ndarray:
    return np.stack(rows).astype(np.float16, copy=False)
