"""Replayable augmentation: an augmented view is a pure function of ``(key, view, seed)``.

The student, the teacher service and the precompute job must produce identical pixels for the
same view, so every random draw comes from a generator seeded by a stable hash (``hashlib``,
never Python's salted ``hash``) of the sample key, the view id (the epoch in training) and the
run seed. No flips: the data is digits and handwriting, where a mirror changes the meaning.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image

SCALE_RANGE = (0.6, 1.0)  # fraction of the image area kept by the random resized crop
RATIO_RANGE = (4.0 / 5.0, 5.0 / 4.0)  # mild aspect jitter (width / height of the crop)
BRIGHTNESS_RANGE = (0.8, 1.2)
CONTRAST_RANGE = (0.8, 1.2)


def view_rng(key: str, view: int, seed: int) -> np.random.Generator:
    """A generator that depends only on (key, view, seed), identical in every process."""
    payload = f"{key}\x00{int(view)}\x00{int(seed)}".encode("utf-8")
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
