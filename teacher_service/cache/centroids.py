"""Class centroids for CLIP-Embed-KD: the teacher's mean image embedding over N drawn samples per class.

Embed-KD replaces per-sample teacher outputs by one anchor per class, μ_c = mean teacher image
embedding of N samples of class c (N = 100 in the paper, drawn at random), computed once before
training. The student side projects and re-normalises the centroids itself
(`student_trainer.losses.EmbedKDLoss`), so μ_c is the plain mean of the L2-normalised wire
embeddings, not re-normalised here.

The caller passes whatever embeds images (a local engine, a Serve handle), so precompute and a
training run compute centroids with the same code; the draw is seeded and independent of shard
order (:class:`ClassSampler`).
"""
from __future__ import annotations

import hashlib
import heapq
from typing import Callable

import numpy as np


def sample_priority(seed: int, key: str) -> int:
    """A sample's place in a seeded random order of the data, independent of the order it is read in."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "little")


class ClassSampler:
    """``per_class`` samples of each class drawn uniformly without replacement, seeded, in one pass:
    per class, the samples of lowest :func:`sample_priority` (so the draw does not depend on shard
    order, and holds at most ``per_class`` items per class)."""

    def __init__(self, per_class: int, seed: int) -> None:
        self.per_class, self.seed = int(per_class), int(seed)
        self.heaps: dict[int, list] = {}

    def offer(self, key: str, label: int, item) -> None:
        heap = self.heaps.setdefault(int(label), [])
        entry = (-sample_priority(self.seed, key), key, item)
        if len(heap) < self.per_class:
            heapq.heappush(heap, entry)
        elif entry[0] > heap[0][0]:
            heapq.heapreplace(heap, entry)

    def chosen(self) -> list[tuple[str, int, object]]:
        """(key, label, item) of every drawn sample, by label then key."""
        return sorted((key, label, item) for label, heap in self.heaps.items() for _, key, item in heap)


def drawn_class_views(shards: list[str], per_class: int, seed: int, image_size: int,
                      skips=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, int64 labels, uint8 [n, S, S, 3] plain resized views) of ``per_class`` labelled samples
    per class drawn from ``shards`` with ``seed``, read in one pass by the shard reader (bad samples
    skipped and counted into ``skips``); at most ``per_class`` views per class are held at once."""
    from teacher_service.contract.augment import augment_view
    from teacher_service.shards import read_samples

    sampler = ClassSampler(per_class, seed)
    for sample in read_samples(shards, skips=skips):
        if sample["cls"] >= 0:
            view = augment_view(sample["image"], sample["__key__"], 0, 0, image_size, train=False)
            sampler.offer(sample["__key__"], sample["cls"], view)
    chosen = sampler.chosen()
    if not chosen:
        raise ValueError(f"no labelled samples (cls members) in {len(shards)} shards, e.g. {shards[0]}")
    return ([key for key, _, _ in chosen], np.asarray([label for _, label, _ in chosen], dtype=np.int64),
            np.stack([view for _, _, view in chosen]))


def draw_per_class(keys: list[str], labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of each class 0..num_classes-1, drawn by :class:`ClassSampler`.

    Raises ValueError naming the classes without any sample. Labels outside [0, num_classes)
    (e.g. -1 for unlabeled samples) are ignored.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(keys) != labels.size:
        raise ValueError(f"labels must be 1-D with one key each, got shape {labels.shape} and {len(keys)} keys")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    sampler = ClassSampler(per_class, seed)
    for index, (key, label) in enumerate(zip(keys, labels.tolist())):
        if 0 <= label < num_classes:
            sampler.offer(str(key), label, index)
    chosen = sampler.chosen()
    missing = sorted(set(range(num_classes)) - {label for _, label, _ in chosen})
    if missing:
        raise ValueError(f"classes without samples: {missing[:20]}{' ...' if len(missing) > 20 else ''} "
                         f"(of {num_classes}; {labels.size} labels given)")
    return np.sort(np.asarray([index for _, _, index in chosen], dtype=np.int64))


def class_centroids(
    embed_images: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """float32 [num_classes, D]: the mean of `embed_images` over the given samples of each class.

    `images` uint8 [n, H, W, 3] (the wire format), `labels` int [n]: the samples already drawn
    (:func:`draw_per_class` or :class:`ClassSampler`). They are embedded in chunks of
    `batch_size` (one teacher request each). A class with no sample raises ValueError.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [n, H, W, 3], got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{images.shape[0]} images but labels of shape {labels.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = np.flatnonzero((labels >= 0) & (labels < num_classes))
    missing = sorted(set(range(num_classes)) - set(labels[rows].tolist()))
    if missing:
        raise ValueError(f"classes without samples: {missing[:20]}{' ...' if len(missing) > 20 else ''} "
                         f"(of {num_classes})")
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
