"""Class centroids for CLIP-Embed-KD: the teacher's mean image embedding per class.

Embed-KD replaces per-sample teacher outputs by one anchor per class, μ_c = mean teacher image
embedding of N samples of class c (N = 100 in the paper), computed once before training. The
student side projects and re-normalises the centroids itself (`student_trainer.losses.EmbedKDLoss`),
so μ_c is the plain mean of the L2-normalised wire embeddings, not re-normalised here.

This module depends on nothing but numpy: the caller passes whatever embeds images (a local
engine, a Serve handle, a cache reader), so the teacher service never imports student code.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def select_per_class(labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` samples of each class 0..num_classes-1, in input order.

    Raises ValueError naming the classes without any sample. Labels outside [0, num_classes)
    (e.g. -1 for unlabeled samples) are ignored.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
    missing = [c for c, rows in enumerate(chosen) if rows.size == 0]
    if missing:
        raise ValueError(f"classes without samples: {missing[:20]}{' ...' if len(missing) > 20 else ''} "
                         f"(of {num_classes}; {labels.size} labels given)")
    return np.sort(np.concatenate(chosen))


def class_centroids(
    embed_images: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    per_class: int,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """float32 [num_classes, D]: the mean of `embed_images` over the first `per_class` samples per class.

    `images` uint8 [n, H, W, 3] (the wire format), `labels` int [n]. Only the selected samples are
    embedded, in chunks of `batch_size` (one teacher request each). A class with fewer than
    `per_class` samples averages the ones it has; a class with none raises ValueError.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [n, H, W, 3], got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{images.shape[0]} images but labels of shape {labels.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = select_per_class(labels, num_classes, per_class)
    parts = []
    for start in range(0, rows.size, batch_size):
        chunk = rows[start:start + batch_size]
        features = np.asarray(embed_images(images[chunk]))
        if features.ndim != 2 or features.shape[0] != chunk.size:
            raise ValueError(f"embed_images returned shape {features.shape} for {chunk.size} images")
        parts.append(features.astype(np.float32))
    features = np.concatenate(parts)
    chosen = labels[rows]
    # float64 sums: fp16 wire embeddings averaged over many samples lose nothing to rounding
    sums = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    np.add.at(sums, chosen, features.astype(np.float64))
    counts = np.bincount(chosen, minlength=num_classes)[:num_classes]
    return (sums / counts[:, None]).astype(np.float32)
