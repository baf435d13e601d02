"""Replayable views: an augmented view is a pure function of ``(key, view, seed)``.

The student, the teacher service and the precompute job must produce identical pixels for the
same view, so every random draw comes from a generator seeded by a stable hash (``hashlib``,
never Python's salted ``hash``) of the sample key, the view id (the epoch in training) and the
run seed. No flips: the data is digits and handwriting, where a mirror changes the meaning.

This lives in ``teacher_service`` (which never imports student code) so the precompute job can
compute the very views students train on (`student_trainer.data.batches` imports it). The
recipe (:func:`view_recipe`) and the digests (:func:`image_digests`, :func:`token_digests`) let a
cache prove that its embeddings were computed from the pixels and tokens a student now holds.
"""
from __future__ import annotations

import hashlib
import io
import math

import numpy as np
from PIL import Image

from teacher_service.contract.preprocess import fit_context

SCALE_RANGE = (0.6, 1.0)  # fraction of the image area kept by the random resized crop
RATIO_RANGE = (4.0 / 5.0, 5.0 / 4.0)  # mild aspect jitter (width / height of the crop)
BRIGHTNESS_RANGE = (0.8, 1.2)
CONTRAST_RANGE = (0.8, 1.2)

AUGMENT_FUNCTION = "teacher_service.contract.augment.augment_view"
# the same function under the name it had before this module moved: caches and clients that
# recorded it stay valid (`same_augment_function`)
FORMER_AUGMENT_FUNCTIONS = ("teacher_service.views.augment_view",)
AUGMENT_VERSION = "1"  # bump whenever augment_view's output changes for any input: caches notice
RECIPE_VIEW_FIELDS = ("function", "version", "image_size", "seed", "train")
# The plain view (`augment_view(train=False)`, what evaluation feeds a model at its own input size)
# in open_clip's preprocessing terms: a PIL bilinear resize straight to the size. An exported
# student declares it, so open_clip's transforms give it the pixels `kd eval` gave it.
EVAL_RESIZE = {"interpolation": "bilinear", "resize_mode": "squash"}
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")  # data.py's order


def view_rng(key: str, view: int, seed: int) -> np.random.Generator:
    """A generator that depends only on (key, view, seed), identical in every process."""
    payload = f"{key}\x00{int(view)}\x00{int(seed)}".encode()
    digest = hashlib.sha256(payload).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 HxW / HxWx1 / HxWx3 / HxWx4 → uint8 HxWx3 (alpha is dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"augment_view expects a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"augment_view expects HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"augment_view got an empty image of shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[float, float, float, float]:
    """A random resized crop box (left, top, right, bottom) in pixel coordinates, sub-pixel allowed."""
    area = rng.uniform(*SCALE_RANGE) * height * width
    log_ratio = rng.uniform(math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1]))
    ratio = math.exp(log_ratio)
    crop_w = min(float(width), math.sqrt(area * ratio))
    crop_h = min(float(height), math.sqrt(area / ratio))
    left = rng.uniform(0.0, width - crop_w)
    top = rng.uniform(0.0, height - crop_h)
    return left, top, left + crop_w, top + crop_h


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness then contrast (around the mean grey level), rounded back to uint8."""
    brightness = rng.uniform(*BRIGHTNESS_RANGE)
    contrast = rng.uniform(*CONTRAST_RANGE)
    pixels = image.astype(np.float32) * np.float32(brightness)
    grey = np.float32(pixels.mean())
    pixels = (pixels - grey) * np.float32(contrast) + grey
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def augment_view(
    image: np.ndarray, key: str, view: int, seed: int, size: int, train: bool = True
) -> np.ndarray:
    """Return view ``view`` of ``image`` as uint8 ``[size, size, 3]`` RGB.

    ``train=True``: random resized crop (area 0.6-1.0, mild aspect jitter) plus brightness and
    contrast jitter, all drawn from :func:`view_rng` so the same inputs give identical bytes in
    any process. ``train=False``: a plain bilinear resize, no randomness.
    """
    if int(size) <= 0:
        raise ValueError(f"augment_view size must be positive, got {size}")
    rgb = Image.fromarray(to_rgb(image))
    if not train:
        return np.asarray(rgb.resize((size, size), Image.BILINEAR), dtype=np.uint8).copy()
    rng = view_rng(key, view, seed)
    box = _crop_box(rng, rgb.height, rgb.width)
    cropped = np.asarray(rgb.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8)
    return _jitter(cropped, rng)


def view_recipe(image_size: int | None, seed: int | None, train: bool = True, **extra) -> dict:
    """Everything besides (key, view) that decides a view's pixels, as stored with cached embeddings.

    ``extra`` records how captions were tokenised (``tokenizer``, ``context_length``); it is
    informational, since token digests catch any difference per row.
    """
    return {"function": AUGMENT_FUNCTION, "version": AUGMENT_VERSION,
            "image_size": None if image_size is None else int(image_size),
            "seed": None if seed is None else int(seed), "train": bool(train), **extra}


def same_augment_function(a: str, b: str) -> bool:
    """Whether two recipes' ``function`` names are the same function (a former name counts)."""
    names = (AUGMENT_FUNCTION, *FORMER_AUGMENT_FUNCTIONS)
    return a == b or (a in names and b in names)


def recipe_differences(a: dict, b: dict) -> list[str]:
    """Human-readable differences in the pixel-deciding fields of two recipes (None is unknown)."""
    diffs = []
    for name in RECIPE_VIEW_FIELDS:
        va, vb = a.get(name), b.get(name)
        same = same_augment_function(va, vb) if name == "function" else va == vb
        if va is not None and vb is not None and not same:
            diffs.append(f"{name} {va!r} vs {vb!r}")
    return diffs


def _sha256(*parts: bytes) -> bytes:
    h = hashlib.sha256()  # hardware-accelerated on current CPUs: ~1.6x blake2b on 224 px views
    for part in parts:
        h.update(part)
    return h.digest()


def _as_u64(digests: list[bytes]) -> np.ndarray:
    return np.fromiter((int.from_bytes(d[:8], "little") for d in digests), dtype=np.uint64, count=len(digests))


def image_sha256(images: np.ndarray) -> list[bytes]:
    """The full 32-byte SHA-256 of each uint8 view, its shape included: what the teacher computes on.

    Full width because the teacher pool uses it as a sample's identity across tenants
    (`serve.coalesce`): a truncated digest would let a caller search for a collision offline."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"image digests expect uint8 [B, H, W, C], got {images.dtype} {images.shape}")
    shape = np.asarray(images.shape[1:], dtype=np.int64).tobytes()
    return [_sha256(shape, memoryview(im).cast("B")) for im in images]


def token_sha256(tokens: np.ndarray, context_length: int) -> list[bytes]:
    """The full SHA-256 of each token row after fitting it to the teacher's ``context_length``."""
    fitted = np.ascontiguousarray(fit_context(np.asarray(tokens, dtype=np.int64), int(context_length)),
                                  dtype=np.int64)
    return [_sha256(row.tobytes()) for row in fitted]


def image_digests(images: np.ndarray) -> np.ndarray:
    """uint64 [B]: :func:`image_sha256` cut to 64 bits, as caches store it (a check, not an identity)."""
    return _as_u64(image_sha256(images))


def token_digests(tokens: np.ndarray, context_length: int) -> np.ndarray:
    """uint64 [B]: :func:`token_sha256` cut to 64 bits, as caches store it."""
    return _as_u64(token_sha256(tokens, context_length))


def image_refs(images: np.ndarray, shards: list[str], views, recipe: dict):
    """`protocol.ImageRefs` for views a caller holds: sample i is view ``views[i]`` (or ``views``
    for all) of the sample keyed like request row i in ``shards[i]``, made by ``recipe``.

    The digests are computed here from ``images``, the pixels the caller trains on, so a teacher
    that regenerates anything else refuses instead of answering for other pixels."""
    from teacher_service.contract.protocol import ImageRefs

    distinct = list(dict.fromkeys(shards))
    position = {path: i for i, path in enumerate(distinct)}
    n = len(shards)
    views = np.broadcast_to(np.asarray(views, dtype=np.int64), (n,)).copy()
    digests = np.frombuffer(b"".join(image_sha256(images)), dtype=np.uint8).reshape(n, 32).copy()
    return ImageRefs(shards=distinct, shard_index=np.asarray([position[p] for p in shards], dtype=np.int32),
                     views=views, sha256=digests, recipe={k: recipe[k] for k in RECIPE_VIEW_FIELDS})


def view_namespace(recipe: dict, data_id: str) -> str:
    """A short digest of what, besides (key, view), decides a sample's pixels and caption: the
    view recipe and the data (e.g. the sorted shard paths). Runs with equal namespaces send the
    same `EmbedRequest.view`, which places their identical requests on one replica; what they
    share there is decided by the pixels and tokens (`coalesce.Coalescer`)."""
    import json

    payload = json.dumps({"recipe": recipe, "data": data_id}, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:24]


def view_identity(namespace: str, view: int) -> str:
    """`EmbedRequest.view` for view `view` of the data and recipe that `namespace` names."""
    return f"{namespace}/{int(view)}"
