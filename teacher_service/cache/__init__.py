"""The teacher embedding cache: Parquet files (`store`), filled offline (`precompute`), checked (`audit`).

Rows are keyed by (sample key, view) under one teacher fingerprint and view recipe; `centroids`
computes Embed-KD class centroids; `embedders` gives offline work a local teacher or a running app.
"""
from teacher_service.cache.store import (
    CENTROIDS_FILE,
    CacheAppender,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    CacheMissError,
    EmbeddingCache,
    compact,
    read_centroids,
)

__all__ = ["CENTROIDS_FILE", "CacheAppender", "CacheCorruptError", "CacheError", "CacheMismatchError",
           "CacheMissError", "EmbeddingCache", "compact", "read_centroids"]
