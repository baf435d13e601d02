"""The batched core: many requests → one forward pass → one response per request.

Plain Python with no Serve dependency, so it is unit-testable directly (Serve's `@serve.batch`
does not work in local testing mode) and reusable in-process (the `inline` teacher source).
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import torch

from teacher_service.model import FrozenTeacher
from teacher_service.contract.preprocess import fit_context, to_model_input
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse, RequestError, RequestLimits, validate_request


class TeacherOutputError(RuntimeError):
    """The teacher produced NaN/Inf features (broken weights, fp16 overflow): never sent as targets."""


class TeacherEngine:
    """Validates requests and answers the valid ones of a batch with a single forward pass.

    `stats`: requests/samples answered, batches (forward passes), errors (requests refused),
    max_batch_samples (largest forward), forward_s (time in preprocessing + forward).
    """

    def __init__(self, teacher: FrozenTeacher, limits: RequestLimits | None = None, views=None):
        """`views` (a `references.ViewResolver`) lets requests name their views by reference;
        without one such requests are refused."""
        self.teacher = teacher
        self.views = views
        limits = limits or RequestLimits()
        if limits.vocab_size is None:
            limits = dataclasses.replace(limits, vocab_size=teacher.vocab_size)
        self.limits = limits
        self._lock = threading.Lock()
        self.stats: dict[str, float] = {"requests": 0, "samples": 0, "batches": 0, "errors": 0,
                                        "max_batch_samples": 0, "forward_s": 0.0}

    def validate(self, request: EmbedRequest) -> None:
        """validate_request against this engine's limits, counting refusals."""
        try:
            validate_request(request, self.limits)
        except RequestError:
            self._count(errors=1)
            raise

    def materialize(self, request: EmbedRequest) -> tuple[EmbedRequest, list[bytes] | None]:
        """`request` with pixels in place of image references (a validated request; counts
        refusals), and the digests the reference check computed of those pixels (None for a
        request that sent pixels: `ViewResolver.resolve_with_digests`).

        The replica calls this before coalescing, so the rest of the path only ever sees pixels."""
        if getattr(request, "image_refs", None) is None:
            return request, None
        try:
            if self.views is None:
                raise RequestError("image_refs: this teacher reads no shards (its serving.shard_roots are empty); "
                                   "send pixels")
            return self.views.resolve_with_digests(request)
        except RequestError:
            self._count(errors=1)
            raise

    def embed(self, request: EmbedRequest) -> EmbedResponse:
        """Answer one request; raises RequestError when it is invalid, TeacherOutputError when the
        teacher's features for it are not finite."""
        result = self.embed_many([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def embed_many(self, requests: list[EmbedRequest]) -> list[EmbedResponse | RequestError | TeacherOutputError]:
        """One slot per request: its EmbedResponse, the RequestError that refused it, or a
        TeacherOutputError when its features came out NaN/Inf (the other requests are unaffected)."""
        requests = list(requests)  # references are replaced by pixels in this copy, not the caller's list
        results: list[EmbedResponse | RequestError | None] = [None] * len(requests)
        valid: list[int] = []
        for i, req in enumerate(requests):
            try:
                self.validate(req)
                requests[i] = req = self.materialize(req)[0]
                valid.append(i)
            except RequestError as e:
                results[i] = e
        if valid:
            for i, resp in zip(valid, self._forward([requests[i] for i in valid])):
                results[i] = resp
        return results  # type: ignore[return-value]

    def _forward(self, reqs: list[EmbedRequest]) -> list[EmbedResponse]:
        """Preprocess per request (sizes may differ), concatenate, encode once, split back."""
        t0 = time.perf_counter()
        t = self.teacher
        img_idx = [j for j, r in enumerate(reqs) if r.images is not None]
        tok_idx = [j for j, r in enumerate(reqs) if r.tokens is not None]
        pixels = torch.cat([to_model_input(reqs[j].images, t.spec, device=t.device) for j in img_idx]) \
            if img_idx else None
        tokens = torch.cat([torch.as_tensor(fit_context(reqs[j].tokens, t.context_length)) for j in tok_idx]) \
            if tok_idx else None
        feats = t.encode_tensors(pixels, tokens)
        image_parts = _split(feats.get("image_features"), img_idx, reqs)
        text_parts = _split(feats.get("text_features"), tok_idx, reqs)
        n = sum(len(r) for r in reqs)
        forward_s = time.perf_counter() - t0
        out = [EmbedResponse(keys=list(r.keys), image_features=image_parts.get(j),
                             text_features=text_parts.get(j), logit_scale=t.logit_scale,
                             logit_bias=t.logit_bias, fingerprint=t.fingerprint,
                             compute_s=forward_s * len(r) / n) for j, r in enumerate(reqs)]
        self._count(requests=len(reqs), samples=n, batches=1, forward_s=forward_s, batch=n)
        return [_finite_or_error(resp) for resp in out]

    def _count(self, requests: int = 0, samples: int = 0, batches: int = 0, errors: int = 0,
               forward_s: float = 0.0, batch: int = 0) -> None:
        with self._lock:
            s = self.stats
            s["requests"] += requests
            s["samples"] += samples
            s["batches"] += batches
            s["errors"] += errors
            s["forward_s"] += forward_s
            s["max_batch_samples"] = max(s["max_batch_samples"], batch)


def _finite_or_error(resp: EmbedResponse) -> EmbedResponse | TeacherOutputError:
    """The response, or a TeacherOutputError naming the first sample with a NaN/Inf feature."""
    for name in ("image_features", "text_features"):
        feats = getattr(resp, name)
        if feats is None:
            continue
        bad = np.flatnonzero(~np.isfinite(feats).all(axis=1))
        if bad.size:
            return TeacherOutputError(
                f"teacher {resp.fingerprint} produced NaN/Inf {name} for {bad.size} of {len(resp)} samples "
                f"(first: {resp.keys[bad[0]]!r}); not sent as distillation targets. Check the weights and "
                f"precision (fp16 overflow?)")
    return resp


def _split(features: np.ndarray | None, idx: list[int], reqs: list[EmbedRequest]) -> dict[int, np.ndarray]:
    """Rows of `features` back to the request positions in `idx` (own copies, not views)."""
    if features is None:
        return {}
    bounds = np.cumsum([0] + [len(reqs[j]) for j in idx])
    return {j: features[a:b].copy() for j, a, b in zip(idx, bounds[:-1], bounds[1:])}
