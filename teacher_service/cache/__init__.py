"""The teacher embedding cache: Parquet files (`store`), filled offline (`precompute`), checked (`audit`).

Rows are keyed by (sample key, view) under one view recipe, one directory per teacher fingerprint
(`teacher_dir`, `cache_teachers`); `centroids` computes Embed-KD class centroids; `embedders` gives
offline work a local teacher or a running app.
"""
from teacher_service.cache.store import (
    CENTROIDS_FILE,
    CacheAmbiguousError,
    CacheAppender,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    CacheMissError,
    EmbeddingCache,
    cache_teachers,
    compact,
    read_centroids,
    teacher_dir,
)

__all__ = ["CENTROIDS_FILE", "CacheAmbiguousError", "CacheAppender", "CacheCorruptError", "CacheError",
           "CacheMismatchError", "CacheMissError", "EmbeddingCache", "cache_teachers", "compact", "read_centroids",
           "teacher_dir"]
