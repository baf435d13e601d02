"""Section 4: the embedding cache. Read rates (open + index, first load of a file's embeddings
from Parquet, serving batches from memory) against the live teacher's rate measured in section 2,
and the bytes a cached sample costs per view, for the cache section 1 built and for synthetic
caches at real teacher widths (random fp16 rows)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from benchmarks.suite.common import BenchRun

SECTION = "cache"


def read_throughput(path: str, batch_size: int, batches: int = 200) -> dict:
    """Open + index, full load of the embeddings from Parquet, then random batches from memory."""
    from teacher_service.cache.store import EmbeddingCache

    start = time.perf_counter()
    cache = EmbeddingCache.open(path)
    open_s = time.perf_counter() - start
    locs = list(cache.index.values())
    start = time.perf_counter()
    for seg in range(len(cache.segments)):
        cache._loaded(seg)
    load_s = time.perf_counter() - start
    nbytes = sum(os.path.getsize(f) for f in cache.files)
    rng = np.random.default_rng(0)
    picks = [[locs[i] for i in rng.integers(0, len(locs), batch_size)] for _ in range(batches)]
    start = time.perf_counter()
    for p in picks:
        cache.fetch(p)
    serve_s = time.perf_counter() - start
    rows = len(cache)
    return {"rows": rows, "embed_dim": cache.embed_dim, "bytes_per_row": nbytes / max(rows, 1),
            "index_rows_per_s": rows / open_s, "load_rows_per_s": rows / load_s,
            "load_mb_per_s": nbytes / load_s / 2**20, "serve_rows_per_s": batches * batch_size / serve_s}


def synthetic_cache(out: Path, dim: int, rows: int, rows_per_file: int = 10000) -> str:
    """A cache of random fp16 rows of width `dim` (read figures at real teacher widths)."""
    from teacher_service.cache.store import make_meta, rows_table, write_table_atomic
    from teacher_service.contract.augment import view_recipe

    out.mkdir(parents=True, exist_ok=True)
    info = {"fingerprint": f"synthetic-{dim}", "embed_dim": dim, "model": "synthetic", "context_length": 77,
            "preprocess": None, "logit_scale": 100.0, "logit_bias": None}
    meta = make_meta(info, view_recipe(224, 0), kind="shard", views=1)
    rng = np.random.default_rng(0)
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        emb = rng.standard_normal((n, dim)).astype(np.float16)
        keys = [f"sample-{start + i:09d}" for i in range(n)]
        write_table_atomic(rows_table(meta, keys, 0, emb, emb, np.arange(n), np.arange(n)),
                           str(out / f"train-{start // rows_per_file:06d}.parquet"))
    return str(out)


def run_cache(run: BenchRun) -> None:
    cb = run.cfg.cache
    caches: dict[str, str] = {}
    if run.shared.get("student_cache"):
        caches["section 1 cache"] = run.shared["student_cache"]
    for dim in cb.synthetic_dims:
        run.log(f"cache: writing a synthetic cache, D={dim}, {cb.synthetic_rows} rows")
        caches[f"synthetic D={dim}"] = synthetic_cache(run.work / f"synthetic-{dim}", dim, cb.synthetic_rows)
    teacher_rate = run.shared.get("teacher_direct_rate")
    for label, path in caches.items():
        reps = []
        for rep in range(run.cfg.repeats):
            run.log(f"cache: reading {label}, repeat {rep + 1}/{run.cfg.repeats}")
            reps.append(read_throughput(path, cb.batch_size, cb.batches))
        _record(run, label, reps, teacher_rate)


def _record(run: BenchRun, label: str, reps: list[dict], teacher_rate: float | None) -> None:
    params = {"cache": label, "rows": reps[0]["rows"], "embed_dim": reps[0]["embed_dim"],
              "batch_size": run.cfg.cache.batch_size}
    run.add(SECTION, f"bytes/sample/view ({label})", "bytes", [reps[0]["bytes_per_row"]], params=params,
            kind="derived", note="Parquet file bytes over rows (image + text fp16 embeddings, digests, key)")
    names = {"index_rows_per_s": "open + index", "load_rows_per_s": "first load from Parquet",
             "serve_rows_per_s": "serve batches from memory"}
    for key, what in names.items():
        run.add(SECTION, f"{what} rows/s ({label})", "rows/s", [r[key] for r in reps], params=params)
    if teacher_rate:
        ratio = [r["load_rows_per_s"] / teacher_rate for r in reps]
        run.add(SECTION, f"first-load rate / live teacher rate ({label})", "x", ratio, params=params, kind="derived",
                note=f"live teacher: section 2's direct forward, {teacher_rate:.1f} samples/s; > 1: reading is not "
                     "the limit")
