"""``kd cache audit``: recompute a random sample of cached rows with the live teacher and compare.

Rows are found in their source shard (recorded by precompute) or, for appended (hybrid) rows, in
the shards given, and read with the one shard reader, so an audit sees the pixels training saw.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from teacher_service.cache.embedders import make_embedder, tokenizer_for
from teacher_service.cache.precompute import embed_views, sample_views
from teacher_service.cache.store import CacheMismatchError, EmbeddingCache, read_meta
from teacher_service.config import TeacherConfig
from teacher_service.shards import read_samples
from teacher_service.shards.reader import raw_samples


@dataclass
class AuditReport:
    """Cached vs live teacher on a random sample of rows (cosine of the fp16 embeddings)."""

    cache: str
    fingerprint: str
    rows: int
    worst_image_cosine: float
    worst_text_cosine: float
    mean_image_cosine: float
    worst_row: dict
    digest_mismatches: int  # recomputed views/tokens that differ from what was cached (must be 0)
    unlocatable: int  # sampled rows whose source sample could not be found (appended rows without --shards)
    threshold: float = 0.999

    @property
    def ok(self) -> bool:
        return self.rows > 0 and self.digest_mismatches == 0 and \
            min(self.worst_image_cosine, self.worst_text_cosine) >= self.threshold

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def audit_cache(cache_path: str, *, teacher: Optional[TeacherConfig] = None, app_name: Optional[str] = None,
                samples: int = 64, shards: Optional[list[str]] = None, seed: int = 0,
                threshold: float = 0.999, fingerprint: Optional[str] = None) -> AuditReport:
    """Recompute ``samples`` random cached rows of one teacher with that teacher live and report the
    worst agreement.

    The teacher is ``app_name`` (a running app), else ``teacher``, else the teacher config its rows
    recorded; in a root holding several teachers a live teacher's fingerprint picks its rows, and
    without one ``fingerprint`` does (:func:`teacher_dir`). The live teacher must have the rows'
    fingerprint.
    """
    if app_name is None and teacher is None:
        cache = EmbeddingCache.open(cache_path, teacher=fingerprint)
        stored = cache.meta.get("teacher_config")
        if not stored:
            raise ValueError(f"cache {cache.path} was computed through app {cache.meta.get('app_name')!r} and "
                             "records no teacher config: pass app_name (--app-name) or a teacher config")
        embedder = make_embedder(TeacherConfig.from_record(stored))
    else:
        embedder = make_embedder(teacher, app_name)
        cache = EmbeddingCache.open(cache_path, teacher=embedder.info["fingerprint"])
    live = embedder.info["fingerprint"]
    if live != cache.fingerprint:
        raise CacheMismatchError(f"cache {cache.path} holds teacher fingerprint {cache.fingerprint!r}, the live "
                                 f"teacher has {live!r}: an audit would compare two different teachers")
    picks = _pick_rows(cache, samples, seed)
    where = _locate_sources(cache, picks, shards)
    recipe = dict(cache.recipe)
    recipe["tokenizer"] = recipe.get("tokenizer") or cache.meta["teacher"]["model"]
    recipe["context_length"] = recipe.get("context_length") or cache.meta["teacher"]["context_length"]
    tokenizer = tokenizer_for(recipe)
    cos_i, cos_t, digest_bad, rows_info = [], [], 0, []
    for shard, wanted in where.items():
        found = {s["__key__"]: s for s in read_samples([shard]) if s["__key__"] in wanted}
        keys = sorted(found)
        if not keys:
            continue
        view_ids = [sorted(wanted[k]) for k in keys]
        pixels = [sample_views(found[k], v, recipe) for k, v in zip(keys, view_ids)]
        live_rows = embed_views(embedder, tokenizer, keys, [found[k]["txt"] for k in keys], view_ids, pixels)
        pairs = [(k, v) for k, vs in zip(keys, view_ids) for v in vs]
        cached = cache.fetch([cache.index[pair] for pair in pairs])
        ci, ct = _cosine(cached["image_emb"], live_rows["image_emb"]), _cosine(cached["text_emb"], live_rows["text_emb"])
        cos_i.append(ci)
        cos_t.append(ct)
        digest_bad += int(np.sum((cached["image_digest"] != live_rows["image_digest"])
                                 | (cached["text_digest"] != live_rows["text_digest"])))
        rows_info += [{"key": k, "view": v, "shard": shard, "image_cosine": float(a), "text_cosine": float(b)}
                      for (k, v), a, b in zip(pairs, ci, ct)]
    if not rows_info:
        raise ValueError(f"audit of {cache.path}: none of the {len(picks)} sampled rows could be located in "
                         "their shards (pass shards= / --shards for appended rows)")
    ci, ct = np.concatenate(cos_i), np.concatenate(cos_t)
    worst = min(rows_info, key=lambda r: min(r["image_cosine"], r["text_cosine"]))
    return AuditReport(cache=cache.path, fingerprint=cache.fingerprint, rows=len(rows_info),
                       worst_image_cosine=float(ci.min()), worst_text_cosine=float(ct.min()),
                       mean_image_cosine=float(ci.mean()), worst_row=worst, digest_mismatches=digest_bad,
                       unlocatable=len(picks) - len(rows_info), threshold=threshold)


def _pick_rows(cache: EmbeddingCache, samples: int, seed: int) -> list[tuple[str, int]]:
    entries = list(cache.index)
    if not entries:
        raise ValueError(f"cache {cache.path} is empty")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(entries), size=min(samples, len(entries)), replace=False)
    return [entries[i] for i in sorted(chosen)]


def _locate_sources(cache: EmbeddingCache, picks: list[tuple[str, int]],
                    shards: Optional[list[str]]) -> dict[str, dict[str, list[int]]]:
    """shard path → {key: [views]} for the picked rows."""
    sources = {}
    for seg_no, segment in enumerate(cache.segments):
        if segment.path is not None:
            sources[seg_no] = read_meta(segment.path).get("source")
    by_key: dict[str, str] = {}
    if shards:
        wanted_keys = {k for k, _ in picks}
        for shard in shards:
            for sample in _sample_keys(os.path.abspath(shard)):
                if sample in wanted_keys:
                    by_key.setdefault(sample, os.path.abspath(shard))
    where: dict[str, dict[str, list[int]]] = {}
    for key, view in picks:
        source = sources.get(cache.index[(key, view)][0]) or by_key.get(key)
        if source and os.path.isfile(source):
            where.setdefault(source, {}).setdefault(key, []).append(view)
    return where


def _sample_keys(shard: str):
    """The keys of a shard's samples (members read, images not decoded)."""
    from teacher_service.shards import ReaderLimits, SkipCounts

    for sample in raw_samples(shard, SkipCounts(), ReaderLimits(), False):
        yield sample["__key__"]
