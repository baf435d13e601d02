"""What goes over the wire between students and the teacher, and how a request is checked.

Requests are mini-batches (a student sends its per-rank batch in one request). Validation runs
before a request joins a Serve batch, so one malformed request fails alone and never poisons the
forward pass of the requests it would have been batched with.

Decision on grayscale: images must be RGB uint8 [b, H, W, 3]. A [b, H, W] array is refused with a
message saying so, rather than silently repeated, because the design fixes one wire format and a
2-D-per-sample array is more often a bug (a dropped channel axis) than a deliberate choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class RequestError(ValueError):
    """A request the teacher refuses; the message names the field and the problem."""


@dataclass
class RequestLimits:
    """Per-request bounds that protect a replica (memory, bandwidth, embedding lookups)."""

    max_samples: int = 1024
    max_image_side: int = 1024
    max_context_length: int = 512
    vocab_size: int | None = None   # token ids must be < vocab_size when set (the engine sets it)
    max_weight: float = 100.0       # largest fair-share weight a caller may claim


@dataclass
class EmbedRequest:
    """One mini-batch: `keys[i]` names sample i; images uint8 [b, H, W, 3], tokens int [b, L].

    `run` identifies the caller (a student run) for accounting and fair share; `weight` is its
    share of the teacher under contention (w / sum of the waiting runs' weights). Neither changes
    the result.

    `view` names the view every sample of the request is in (the client derives it from the
    data, the view recipe and the view id, see `teacher_service.contract.augment.view_identity`).
    A non-empty view opts the request into coalescing and places it on the replica where the
    same view and keys go (`serve.routing`); it is a hint, never an identity: the replica
    identifies each sample by the digest of its pixels and tokens (`serve.coalesce`), so a
    sample already being computed, or computed recently, by any caller is answered from that
    computation, and what a caller claims cannot change another caller's answer. Empty: the
    request is never coalesced.
    """

    keys: list[str]
    images: np.ndarray | None = None
    tokens: np.ndarray | None = None
    run: str = ""
    view: str = ""
    weight: float = 1.0

    def __len__(self) -> int:
        """Number of samples; never raises, so Serve's batch_size_fn is safe on any request."""
        try:
            return len(self.keys)
        except TypeError:
            return 0


@dataclass
class EmbedResponse:
    """Features for one request, row i for keys[i]; L2-normalised float16 [b, D] or None."""

    keys: list[str]
    image_features: np.ndarray | None
    text_features: np.ndarray | None
    logit_scale: float
    logit_bias: float | None
    fingerprint: str

    def __len__(self) -> int:
        return len(self.keys)


def validate_request(req, limits: RequestLimits) -> None:
    """Raise RequestError for the first problem found; return None for a servable request."""
    if not isinstance(req, EmbedRequest):
        raise RequestError(f"request: expected EmbedRequest, got {type(req).__name__}")
    b = _check_keys(req.keys)
    if b > limits.max_samples:
        raise RequestError(f"keys: request has {b} samples, more than max_samples={limits.max_samples}; split it")
    if not isinstance(req.run, str):
        raise RequestError(f"run: expected str, got {type(req.run).__name__}")
    _check_view(req.view)
    _check_weight(req.weight, limits)
    if req.images is None and req.tokens is None:
        raise RequestError("images/tokens: request carries neither images nor tokens")
    if req.images is not None:
        _check_images(req.images, b, limits)
    if req.tokens is not None:
        _check_tokens(req.tokens, b, limits)


MAX_VIEW_CHARS = 256


def _check_view(view) -> None:
    if not isinstance(view, str):
        raise RequestError(f"view: expected str, got {type(view).__name__}")
    if len(view) > MAX_VIEW_CHARS:
        raise RequestError(f"view: {len(view)} characters, more than {MAX_VIEW_CHARS}")


def _check_weight(weight, limits: RequestLimits) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RequestError(f"weight: expected a number, got {type(weight).__name__}")
    if not (0 < weight <= limits.max_weight):  # also refuses NaN
        raise RequestError(f"weight: {weight!r} outside (0, max_weight={limits.max_weight}]")


def _check_keys(keys) -> int:
    if not isinstance(keys, (list, tuple)):
        raise RequestError(f"keys: expected a list of str, got {type(keys).__name__}")
    if len(keys) == 0:
        raise RequestError("keys: request is empty (0 samples)")
    bad = next((i for i, k in enumerate(keys) if not isinstance(k, str)), None)
    if bad is not None:
        raise RequestError(f"keys: entry {bad} is {type(keys[bad]).__name__}, expected str")
    return len(keys)


def _check_images(images, b: int, limits: RequestLimits) -> None:
    if not isinstance(images, np.ndarray):
        raise RequestError(f"images: expected a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise RequestError(f"images: expected dtype uint8 (0..255 RGB), got {images.dtype}")
    if images.ndim == 3:
        raise RequestError(f"images: got shape {images.shape}; grayscale [b, H, W] is not accepted, "
                           "send RGB [b, H, W, 3] (repeat the channel)")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise RequestError(f"images: expected shape [b, H, W, 3], got {images.shape}")
    if images.shape[0] != b:
        raise RequestError(f"images: {images.shape[0]} images for {b} keys")
    h, w = images.shape[1:3]
    if min(h, w) < 1:
        raise RequestError(f"images: empty image side in shape {images.shape}")
    if max(h, w) > limits.max_image_side:
        raise RequestError(f"images: side {max(h, w)} exceeds max_image_side={limits.max_image_side}")


def _check_tokens(tokens, b: int, limits: RequestLimits) -> None:
    if not isinstance(tokens, np.ndarray):
        raise RequestError(f"tokens: expected a numpy array, got {type(tokens).__name__}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise RequestError(f"tokens: expected an integer dtype (int64 ids), got {tokens.dtype}")
    if tokens.ndim != 2:
        raise RequestError(f"tokens: expected shape [b, L], got {tokens.shape}")
    if tokens.shape[0] != b:
        raise RequestError(f"tokens: {tokens.shape[0]} rows for {b} keys")
    length = tokens.shape[1]
    if length < 1 or length > limits.max_context_length:
        raise RequestError(f"tokens: length {length} outside 1..max_context_length={limits.max_context_length}")
    row_max = tokens.max(axis=1)
    lo, hi = int(tokens.min()), int(row_max.max())
    if lo < 0:
        raise RequestError(f"tokens: negative id {lo}")
    if limits.vocab_size is not None and hi >= limits.vocab_size:
        raise RequestError(f"tokens: id {hi} out of vocabulary range [0, {limits.vocab_size})")
    empty = np.flatnonzero(row_max == 0)
    if empty.size:
        raise RequestError(f"tokens: row {int(empty[0])} is all padding (no EOT token)")
