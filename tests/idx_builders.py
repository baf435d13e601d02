"""Tiny IDX files (the MNIST family's format) written by the tests themselves: CI does not install
Debian's dataset packages. Used by the ingestion tests (tests/test_idx.py) and the demo's."""
from __future__ import annotations

import gzip
import struct

import numpy as np

from student_trainer.data.idx import IMAGES_MAGIC, LABELS_MAGIC


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(path, array, magic, gz: bool) -> None:
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def make_split(folder, name: str, counts: list[int], seed: int, *, gz: bool, prefix: str = "", label_offset: int = 0,
               side: tuple[int, int] = (28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """Random images and shuffled labels with ``counts[c]`` samples of class c, as two IDX files."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)) + label_offset
    images = rng.integers(0, 256, (len(labels), *side), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}{name}-images-idx3-ubyte{suffix}", images, IMAGES_MAGIC, gz)
    write_idx(folder / f"{prefix}{name}-labels-idx1-ubyte{suffix}", labels, LABELS_MAGIC, gz)
    return images, labels
