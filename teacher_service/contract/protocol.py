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

from teacher_service.contract.answer_codec import ANSWER_DTYPES, EncodedRows


class TeacherUnavailableError(RuntimeError):
    """No running teacher app of the requested name (raised by `teacher_service.app`; defined here,
    with the rest of what students and the teacher agree on, so a training worker can catch it
    without importing Ray Serve)."""


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


REF_RECIPE_FIELDS = ("function", "version", "image_size", "seed", "train")
MAX_SHARD_PATH_CHARS = 4096
SHA256_BYTES = 32


@dataclass
class ImageRefs:
    """Each sample's view named instead of sent: the teacher regenerates it from a shard it can read.

    Sample i is the sample `keys[i]` of the request in shard `shards[shard_index[i]]`, in view
    `views[i]`, augmented by `recipe` (`augment.view_recipe`: function, version, image_size, seed,
    train). `sha256[i]` is `augment.image_sha256` of the pixels the caller trains on: the teacher
    regenerates the view, refuses the request naming the sample when the digests differ, and
    otherwise computes on those pixels exactly as if they had been sent. About 36 bytes a sample
    besides its key and tokens, where a 224 px view is 151 KB: docs/cluster.md says when to use it.
    """

    shards: list[str]
    shard_index: np.ndarray  # int [b]
    views: np.ndarray        # int64 [b]
    sha256: np.ndarray       # uint8 [b, 32]
    recipe: dict

    def __len__(self) -> int:
        try:
            return len(self.shard_index)
        except TypeError:
            return 0


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

    `image_refs` replaces `images` for a teacher that reads the caller's shards (`ImageRefs`):
    the replica turns it into the same uint8 pixels before anything else sees the request.

    `scores`: also answer each sample's score (`teacher_service.scores`: its contrastive loss among
    this request's samples, for data selection); needs images (or references) and tokens.

    `answer_dtype` ("fp16", "bf16", "int8"; None: the pool's `serving.answer_dtype`) is the dtype
    the features come back in (`answer_codec`). It changes only the encoding of this response:
    the replica computes, coalesces, scores and remembers full-precision rows whatever callers ask,
    so `scores` never depend on it.
    """

    keys: list[str]
    images: np.ndarray | None = None
    tokens: np.ndarray | None = None
    run: str = ""
    view: str = ""
    weight: float = 1.0
    image_refs: ImageRefs | None = None
    scores: bool = False
    answer_dtype: str | None = None

    def __len__(self) -> int:
        """Number of samples; never raises, so Serve's batch_size_fn is safe on any request."""
        try:
            return len(self.keys)
        except TypeError:
            return 0


@dataclass
class EmbedResponse:
    """Features for one request, row i for keys[i], L2-normalised, or None: float16 [b, D] for an fp16
    answer, `answer_codec.EncodedRows` for bf16 and int8 (`answer_codec.decode_rows` gives arrays).

    `compute_s` is the teacher compute this request caused: the seconds of each forward pass it
    was in, pro-rated by its share of that forward's samples. Rows answered from another request's
    forward or from a replica's recent rows (`serve.coalesce`) add nothing: they are charged to the
    request that computed them. A student sums it into its run's teacher-seconds (docs/design.md);
    it never changes the features. The gRPC reply does not carry it (0 there).

    `scores` (float32 [b]) answers a request that asked for them (`EmbedRequest.scores`), else None;
    computing them adds to `compute_s`, scores remembered from an identical request add nothing.
    """

    keys: list[str]
    image_features: np.ndarray | EncodedRows | None
    text_features: np.ndarray | EncodedRows | None
    logit_scale: float
    logit_bias: float | None
    fingerprint: str
    compute_s: float = 0.0
    scores: np.ndarray | None = None

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
    if req.answer_dtype is not None and req.answer_dtype not in ANSWER_DTYPES:
        raise RequestError(f"answer_dtype: expected one of {ANSWER_DTYPES} or None (the pool's default), "
                           f"got {req.answer_dtype!r}")
    refs = getattr(req, "image_refs", None)
    if req.images is None and req.tokens is None and refs is None:
        raise RequestError("images/tokens: request carries neither images nor tokens")
    if req.images is not None and refs is not None:
        raise RequestError("images/image_refs: send the pixels or references to them, not both")
    if req.images is not None:
        _check_images(req.images, b, limits)
    if refs is not None:
        _check_image_refs(refs, b, limits)
    if req.tokens is not None:
        _check_tokens(req.tokens, b, limits)
    _check_scores(req)


MAX_VIEW_CHARS = 256


def _check_scores(req: EmbedRequest) -> None:
    scores = getattr(req, "scores", False)
    if not isinstance(scores, bool):
        raise RequestError(f"scores: expected a bool, got {type(scores).__name__}")
    if scores and (req.tokens is None or (req.images is None and getattr(req, "image_refs", None) is None)):
        raise RequestError("scores: a sample's score compares its image and text with the other samples': "
                           "send both images (or image_refs) and tokens")


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


def _check_image_refs(refs, b: int, limits: RequestLimits) -> None:
    """Shapes, types and ranges only: whether the shards exist and hold the views is the replica's
    check (`serve.references`)."""
    if not isinstance(refs, ImageRefs):
        raise RequestError(f"image_refs: expected ImageRefs, got {type(refs).__name__}")
    _check_ref_shards(refs.shards, b)
    _check_int_column(refs.shard_index, b, "image_refs.shard_index")
    if b and (refs.shard_index.min() < 0 or refs.shard_index.max() >= len(refs.shards)):
        raise RequestError(f"image_refs.shard_index: entries must be in [0, {len(refs.shards)})")
    _check_int_column(refs.views, b, "image_refs.views")
    digest = refs.sha256
    if not isinstance(digest, np.ndarray) or digest.dtype != np.uint8 or digest.shape != (b, SHA256_BYTES):
        got = f"{digest.dtype} {digest.shape}" if isinstance(digest, np.ndarray) else type(digest).__name__
        raise RequestError(f"image_refs.sha256: expected uint8 [{b}, {SHA256_BYTES}], got {got}")
    _check_ref_recipe(refs.recipe, limits)


def _check_ref_shards(shards, b: int) -> None:
    if not isinstance(shards, (list, tuple)) or not 1 <= len(shards) <= b:
        raise RequestError(f"image_refs.shards: expected a list of 1..{b} shard paths")
    for path in shards:
        if not isinstance(path, str) or not path or len(path) > MAX_SHARD_PATH_CHARS or "\x00" in path:
            raise RequestError(f"image_refs.shards: {str(path)[:80]!r} is not a shard path "
                               f"(a non-empty str of at most {MAX_SHARD_PATH_CHARS} characters)")


def _check_int_column(values, b: int, name: str) -> None:
    if not isinstance(values, np.ndarray) or not np.issubdtype(values.dtype, np.integer) or values.shape != (b,):
        got = f"{values.dtype} {values.shape}" if isinstance(values, np.ndarray) else type(values).__name__
        raise RequestError(f"{name}: expected an integer array [{b}], got {got}")


def _check_ref_recipe(recipe, limits: RequestLimits) -> None:
    if not isinstance(recipe, dict) or any(name not in recipe for name in REF_RECIPE_FIELDS):
        raise RequestError(f"image_refs.recipe: expected a view recipe with {REF_RECIPE_FIELDS}, got {recipe!r}")
    size, seed = recipe["image_size"], recipe["seed"]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= limits.max_image_side:
        raise RequestError(f"image_refs.recipe: image_size {size!r} outside 1..max_image_side={limits.max_image_side}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise RequestError(f"image_refs.recipe: seed {seed!r} is not an int")
    if not isinstance(recipe["train"], bool) or not all(isinstance(recipe[k], str) for k in ("function", "version")):
        raise RequestError(f"image_refs.recipe: train must be a bool, function and version str; got {recipe!r}")
