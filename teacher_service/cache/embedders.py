"""Where offline work gets teacher embeddings: the teacher loaded in this process, or a running app.

Precompute, centroids and audits take either; both answer ``embed(images=..., tokens=...)`` with an
EmbedResponse and count the seconds spent inside teacher calls.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from teacher_service.config import TeacherConfig
from teacher_service.contract.protocol import EmbedRequest

CHUNK = 256  # samples per teacher request


class LocalEmbedder:
    """The teacher loaded in this process (a Ray Data actor, the CLI, an audit)."""

    def __init__(self, teacher: TeacherConfig) -> None:
        from teacher_service.model import load_teacher
        from teacher_service.serve.engine import TeacherEngine

        self.engine = TeacherEngine(load_teacher(teacher))
        self.info = self.engine.teacher.info()
        self.teacher_s = 0.0

    def _call(self, request: EmbedRequest):
        return self.engine.embed(request)

    def embed(self, images: Optional[np.ndarray] = None, tokens: Optional[np.ndarray] = None):
        n = len(images) if images is not None else len(tokens)
        start = time.perf_counter()
        # fp16 whatever the pool's default: the rows are encoded once, in the cache's dtype, by its writer
        resp = self._call(EmbedRequest(keys=[str(i) for i in range(n)], images=images, tokens=tokens,
                                       run="precompute", answer_dtype="fp16"))
        self.teacher_s += time.perf_counter() - start
        return resp


class ServeEmbedder(LocalEmbedder):
    """A running teacher app (``--app-name``); the handle is made here, inside the caller's process."""

    def __init__(self, app_name: str, timeout_s: float = 300.0) -> None:
        from teacher_service.app import get_teacher_handle

        self.handle = get_teacher_handle(app_name, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.info = self.handle.info.remote().result(timeout_s=timeout_s)
        self.teacher_s = 0.0

    def _call(self, request: EmbedRequest):
        return self.handle.embed.remote(request).result(timeout_s=self.timeout_s)


def make_embedder(teacher: Optional[TeacherConfig | dict] = None, app_name: Optional[str] = None):
    if (teacher is None) == (app_name is None):
        raise ValueError("give exactly one of a teacher config (local teacher) or app_name (running app)")
    if app_name is not None:
        return ServeEmbedder(app_name)
    cfg = teacher if isinstance(teacher, TeacherConfig) else TeacherConfig.from_dict(teacher)
    return LocalEmbedder(cfg)


def embed_chunked(embedder, *, images: Optional[np.ndarray] = None, tokens: Optional[np.ndarray] = None,
                  field_name: str) -> np.ndarray:
    """float16 [n, D] of ``field_name`` over ``images`` or ``tokens``, CHUNK samples per request."""
    data = images if images is not None else tokens
    parts = []
    for start in range(0, len(data), CHUNK):
        chunk = data[start:start + CHUNK]
        resp = embedder.embed(images=chunk if images is not None else None,
                              tokens=chunk if tokens is not None else None)
        parts.append(np.asarray(getattr(resp, field_name), dtype=np.float16))
    return np.concatenate(parts)


def tokenizer_for(recipe: dict):
    import open_clip

    return open_clip.get_tokenizer(recipe["tokenizer"], context_length=int(recipe["context_length"]))


def tokenize(tokenizer, captions: list[str]) -> np.ndarray:
    tokens = tokenizer(captions)
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens, dtype=np.int64)
