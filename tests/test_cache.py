"""The embedding cache on disk: Parquet round trip, refusal of other teachers/recipes, corrupt files,
concurrent appenders, dedupe and compaction, centroids, and the shared replayable views.

No Ray here: everything is files and numpy, so this module runs in seconds.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_service.cache.store import (
    APPEND_PREFIX,
    COMPACTED_PREFIX,
    LOCK_FILE,
    TEACHERS_DIR,
    CacheAppender,
    CacheCorruptError,
    CacheError,
    CacheMismatchError,
    EmbeddingCache,
    column_matrix,
    compact,
    make_meta,
    read_centroids,
    read_rows,
    row_files,
    rows_table,
    write_centroids,
    write_table_atomic,
)
from teacher_service.contract.augment import image_digests, token_digests, view_recipe
from teacher_service.shards import decode_rgb8
from reliability_record import record

D = 8
PRE = {"image_size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
       "resize_mode": "shortest"}


def info(fingerprint: str = "fp-A", preprocess: dict | None = None) -> dict:
    return {"fingerprint": fingerprint, "embed_dim": D, "model": "ViT-B-32", "context_length": 16,
            "preprocess": preprocess or PRE, "logit_scale": 14.25, "logit_bias": None, "precision": "fp32"}


RECIPE = view_recipe(32, 0, tokenizer="ViT-B-32", context_length=16)


def _stable(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def row_values(keys: list[str], view: int) -> dict[str, np.ndarray]:
    """Deterministic, distinct embeddings/digests per (key, view): any mix-up shows."""
    seeds = [_stable(k, view) % 2**32 for k in keys]
    image = np.stack([np.random.default_rng(s).standard_normal(D) for s in seeds]).astype(np.float16)
    text = np.stack([np.random.default_rng(s + 1).standard_normal(D) for s in seeds]).astype(np.float16)
    idig = np.asarray([_stable(k, view, "i") for k in keys], dtype=np.uint64)
    tdig = np.asarray([_stable(k, "t") for k in keys], dtype=np.uint64)
    return {"image": image, "text": text, "idig": idig, "tdig": tdig}


def write_shard_file(path, keys, views=(0,), fingerprint="fp-A", recipe=RECIPE, preprocess=None) -> pa.Table:
    meta = make_meta(info(fingerprint, preprocess), recipe, kind="shard", source="/data/x.tar", views=len(views))
    parts = [(keys, v, row_values(keys, v)) for v in views]
    table = rows_table(meta, [k for ks, _, _ in parts for k in ks],
                       np.concatenate([np.full(len(ks), v) for ks, v, _ in parts]),
                       *(np.concatenate([r[c] for _, _, r in parts]) for c in ("image", "text", "idig", "tdig")))
    write_table_atomic(table, str(path))
    return table


def keys_(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# format


def test_parquet_round_trip_fixed_size_fp16(tmp_path):
    keys = keys_(37)
    write_shard_file(tmp_path / "train-000000.parquet", keys, views=(0, 1))
    table = pq.read_table(tmp_path / "train-000000.parquet")
    assert table.schema.field("image_emb").type == pa.list_(pa.float16(), D)
    assert table.schema.field("view").type == pa.int32() and table.num_rows == 74
    image = table.column("image_emb").combine_chunks().values.to_numpy().reshape(-1, D)
    assert image.dtype == np.float16 and image.shape == (74, D)
    # rows are sorted by (key, view); every row holds exactly what was written for it
    got_keys, got_views = table.column("key").to_pylist(), table.column("view").to_pylist()
    assert list(zip(got_keys, got_views)) == sorted(zip(got_keys, got_views))
    for view in (0, 1):
        sel = [i for i, v in enumerate(got_views) if v == view]
        want = row_values([got_keys[i] for i in sel], view)
        np.testing.assert_array_equal(image[sel], want["image"])
        np.testing.assert_array_equal(column_matrix(table, "text_emb")[sel], want["text"])
        np.testing.assert_array_equal(table.column("image_digest").to_numpy()[sel], want["idig"])
    _, meta = read_rows(str(tmp_path / "train-000000.parquet"))
    assert meta["fingerprint"] == "fp-A" and meta["dtype"] == "float16" and meta["embed_dim"] == D
    assert meta["recipe"]["function"] == "teacher_service.contract.augment.augment_view" and meta["recipe"]["seed"] == 0
    assert meta["teacher"]["preprocess"] == PRE and meta["views"] == 2 and meta["source"] == "/data/x.tar"


def test_bytes_per_row_are_dominated_by_the_embeddings(tmp_path):
    """The figure documented in benchmarks/README.md: ≈ 2 x 2 x D bytes per (sample, view) + ~40."""
    dim, n = 512, 2000
    meta = make_meta({**info(), "embed_dim": dim}, RECIPE, kind="shard")
    rng = np.random.default_rng(0)
    table = rows_table(meta, keys_(n), np.zeros(n), rng.standard_normal((n, dim)).astype(np.float16),
                       rng.standard_normal((n, dim)).astype(np.float16), np.arange(n), np.arange(n))
    write_table_atomic(table, str(tmp_path / "big.parquet"))
    per_row = os.path.getsize(tmp_path / "big.parquet") / n
    assert 4 * dim <= per_row <= 4 * dim + 64


def test_write_is_atomic_and_leaves_no_partial_file(tmp_path, monkeypatch):
    meta = make_meta(info(), RECIPE, kind="shard")
    keys = keys_(10)
    r = row_values(keys, 0)
    table = rows_table(meta, keys, 0, r["image"], r["text"], r["idig"], r["tdig"])
    real_write = pq.write_table

    def crash_midway(tbl, where, **kwargs):
        real_write(tbl.slice(0, 3), where, **kwargs)  # something is on disk under the tmp name...
        raise OSError("disk full")  # ...and then the writer dies

    monkeypatch.setattr(pq, "write_table", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_table_atomic(table, str(tmp_path / "train-000000.parquet"))
    assert os.listdir(tmp_path) == []  # neither the final name nor a tmp file


# ---------------------------------------------------------------------------------------------
# reading


def test_index_dedupes_and_loads_embeddings_lazily(tmp_path):
    write_shard_file(tmp_path / "train-000000.parquet", keys_(20), views=(0, 1))
    write_shard_file(tmp_path / "train-000001.parquet", keys_(10, "t"), views=(0,))
    write_shard_file(tmp_path / f"{APPEND_PREFIX}r-0-x.parquet", keys_(5), views=(1,))  # duplicates of shard 0
    cache = EmbeddingCache.open(str(tmp_path), teacher_info=info(), recipe=RECIPE)
    assert len(cache) == 50 and cache.duplicates == 5
    assert ("s-0003", 1) in cache and ("s-0003", 2) not in cache and ("t-0001", 1) not in cache
    assert all(seg.image_emb is None for seg in cache.segments)  # nothing but keys/digests read yet
    locs = cache.locate(["t-0002", "s-0019", "nope"], view=0)
    assert locs[2] is None
    rows = cache.fetch(locs[:2])
    np.testing.assert_array_equal(rows["image_emb"], np.concatenate(
        [row_values(["t-0002"], 0)["image"], row_values(["s-0019"], 0)["image"]]))
    np.testing.assert_array_equal(rows["text_digest"], np.concatenate(
        [row_values(["t-0002"], 0)["tdig"], row_values(["s-0019"], 0)["tdig"]]))
    assert cache.views_of("s-0003") == [0, 1]
    assert cache.teacher_info["logit_scale"] == 14.25 and cache.embed_dim == D


def test_cache_directories_and_files_are_owner_only(tmp_path):
    root = tmp_path / "shared" / "cache"
    EmbeddingCache.open(str(root), teacher_info=info(), recipe=RECIPE, create=True)
    write_shard_file(root / "train-000000.parquet", keys_(4), views=(0,))
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o700 and root.stat().st_mode & 0o777 == 0o700
    assert (root / "train-000000.parquet").stat().st_mode & 0o777 == 0o600


def test_other_teacher_is_refused_naming_both_fingerprints(tmp_path):
    write_shard_file(tmp_path / "train-000000.parquet", keys_(4), fingerprint="aaaa1111")
    with pytest.raises(CacheMismatchError, match="aaaa1111.*bbbb2222"):
        EmbeddingCache.open(str(tmp_path), teacher_info=info("bbbb2222"))
    # a directory mixing two teachers is refused even without expectations
    write_shard_file(tmp_path / "train-000001.parquet", keys_(4, "t"), fingerprint="cccc3333")
    with pytest.raises(CacheMismatchError, match="cccc3333.*aaaa1111"):
        EmbeddingCache.open(str(tmp_path))


def test_other_preprocessing_or_recipe_is_refused(tmp_path):
    write_shard_file(tmp_path / "train-000000.parquet", keys_(4))
    other_pre = {**PRE, "interpolation": "bilinear"}
    with pytest.raises(CacheMismatchError, match="preprocessing.*bicubic.*bilinear"):
        EmbeddingCache.open(str(tmp_path), teacher_info=info("fp-A", other_pre))
    with pytest.raises(CacheMismatchError, match=r"seed 0 vs 7"):
        EmbeddingCache.open(str(tmp_path), recipe=view_recipe(32, 7))
    with pytest.raises(CacheMismatchError, match=r"image_size 32 vs 64"):
        EmbeddingCache.open(str(tmp_path), recipe=view_recipe(64, 0))
    assert len(EmbeddingCache.open(str(tmp_path), recipe=view_recipe(32, 0))) == 4


def test_truncated_file_is_reported_by_name(tmp_path):
    write_shard_file(tmp_path / "train-000000.parquet", keys_(50))
    write_shard_file(tmp_path / "train-000001.parquet", keys_(50, "t"))
    bad = tmp_path / "train-000001.parquet"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(CacheCorruptError, match="train-000001.parquet.*truncated or corrupt"):
        EmbeddingCache.open(str(tmp_path))


def test_corrupt_embedding_page_is_caught_when_read(tmp_path):
    """A flipped byte inside the embeddings fails its page checksum: never served silently."""
    write_shard_file(tmp_path / "train-000000.parquet", keys_(200))
    path = tmp_path / "train-000000.parquet"
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(0).column(2)  # image_emb
    data[meta.data_page_offset + meta.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = EmbeddingCache.open(str(tmp_path))  # keys/digests are intact
    with pytest.raises(CacheCorruptError, match="train-000000.parquet"):
        cache.fetch(cache.locate(["s-0001"], 0))


def test_foreign_parquet_and_empty_cache(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "notes.parquet")
    with pytest.raises(CacheCorruptError, match="notes.parquet is not an embedding cache file"):
        EmbeddingCache.open(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="kd precompute"):
        EmbeddingCache.open(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no row files"):
        EmbeddingCache.open(str(tmp_path / "empty"))


def test_same_key_with_other_pixels_is_a_conflict(tmp_path):
    write_shard_file(tmp_path / "train-000000.parquet", keys_(3))
    meta = make_meta(info(), RECIPE, kind="append")
    r = row_values(["s-0001"], 0)
    table = rows_table(meta, ["s-0001"], 0, r["image"], r["text"], r["idig"] + np.uint64(1), r["tdig"])
    write_table_atomic(table, str(tmp_path / f"{APPEND_PREFIX}x-0-1.parquet"))
    with pytest.raises(CacheMismatchError, match="s-0001.*two samples share a key"):
        EmbeddingCache.open(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# appending and compaction


def _append_worker(path: str, writer: int, rounds: int) -> None:
    """Each writer appends overlapping keys: key i is written by every writer whose id divides into it."""
    cache = EmbeddingCache.open(path)
    appender = CacheAppender(path, cache.meta, run=f"run{writer}", rank=writer)
    for r in range(rounds):
        keys = [f"k-{i:04d}" for i in range(r * 10, r * 10 + 10) if i % (writer + 1) == 0 or i % 3 == 0]
        vals = row_values(keys, 1)
        appender.add(keys, 1, vals["image"], vals["text"], vals["idig"], vals["tdig"])
        appender.flush()


def _expected_append_keys(writers: int, rounds: int) -> set[str]:
    return {f"k-{i:04d}" for w in range(writers) for i in range(rounds * 10) if i % (w + 1) == 0 or i % 3 == 0}


def _check_served(path: str, base_keys: list[str], append_keys: set[str]) -> EmbeddingCache:
    cache = EmbeddingCache.open(path)
    pairs = [(k, 0) for k in base_keys] + [(k, 1) for k in sorted(append_keys)]
    assert len(cache) == len(pairs) and set(cache.index) == set(pairs)  # nothing lost, nothing twice
    rows = cache.fetch([cache.index[(k, 1)] for k in sorted(append_keys)])
    want = row_values(sorted(append_keys), 1)
    np.testing.assert_array_equal(rows["image_emb"], want["image"])
    np.testing.assert_array_equal(rows["text_emb"], want["text"])
    return cache


def test_concurrent_thread_appenders_lose_and_duplicate_nothing(tmp_path):
    base = keys_(30)
    write_shard_file(tmp_path / "train-000000.parquet", base)
    threads = [threading.Thread(target=_append_worker, args=(str(tmp_path), w, 6)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    append_keys = _expected_append_keys(6, 6)
    files = [f for f in os.listdir(tmp_path) if f.startswith(APPEND_PREFIX)]
    assert len(files) == 36 and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    cache = _check_served(str(tmp_path), base, append_keys)
    assert cache.duplicates > 0  # keys divisible by 3 were appended by every writer


@pytest.mark.slow  # three spawned appender processes
def test_concurrent_process_appenders_then_compaction(tmp_path):
    base = keys_(30)
    write_shard_file(tmp_path / "train-000000.parquet", base)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_worker, args=(str(tmp_path), w, 4)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    append_keys = _expected_append_keys(3, 4)
    before = _check_served(str(tmp_path), base, append_keys)
    report = compact(str(tmp_path))
    assert len(report.merged_files) == 12 and report.rows_written == len(append_keys)
    assert report.duplicates_dropped == sum(before.segments[i].image_digest.size
                                            for i in range(1, len(before.segments))) - len(append_keys)
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith(APPEND_PREFIX)] == []
    assert len([n for n in names if n.startswith(COMPACTED_PREFIX)]) == 1
    after = _check_served(str(tmp_path), base, append_keys)
    assert after.duplicates == 0
    # compaction is idempotent and the compacted file is itself merged next time
    write_shard_file(tmp_path / f"{APPEND_PREFIX}late-0-z.parquet", ["k-0000", "late-1"], views=(1,))
    report = compact(str(tmp_path))
    assert report.rows_written == len(append_keys) + 1 and report.duplicates_dropped == 1
    assert len(EmbeddingCache.open(str(tmp_path))) == len(base) + len(append_keys) + 1


def test_compaction_refuses_to_run_twice_at_once(tmp_path):
    write_shard_file(tmp_path / "train-000000.parquet", keys_(3))
    (tmp_path / LOCK_FILE).write_text("other host 123\n")
    with pytest.raises(CacheError, match="another compaction"):
        compact(str(tmp_path))


def test_in_memory_add_dedupes_within_a_call(tmp_path):
    cache = EmbeddingCache.open(str(tmp_path / "c"), teacher_info=info(), recipe=RECIPE, create=True)
    keys = ["a", "b", "a", "c"]
    vals = row_values(keys, 0)
    fresh = cache.add(keys, 0, vals["image"], vals["text"], vals["idig"], vals["tdig"])
    assert fresh == [True, True, False, True] and len(cache) == 3
    assert cache.add(["a"], 0, vals["image"][:1], vals["text"][:1], vals["idig"][:1], vals["tdig"][:1]) == [False]
    np.testing.assert_array_equal(cache.fetch(cache.locate(["c"], 0))["image_emb"], vals["image"][3:])
    assert row_files(str(tmp_path / "c")) == []  # add() indexes in memory; CacheAppender writes


# ---------------------------------------------------------------------------------------------
# centroids


def test_centroids_round_trip_and_fingerprint(tmp_path):
    cents = np.random.default_rng(0).standard_normal((10, D)).astype(np.float32)
    meta = make_meta(info("fp-C"), view_recipe(32, None, train=False), kind="centroids")
    path = write_centroids(str(tmp_path / "centroids.parquet"), cents, meta, counts=np.full(10, 5),
                           class_names=[f"c{i}" for i in range(10)])
    got, got_meta = read_centroids(str(tmp_path), fingerprint="fp-C")
    np.testing.assert_array_equal(got, cents)
    assert got_meta["kind"] == "centroids" and got_meta["fingerprint"] == "fp-C"
    assert pq.read_table(path).column("name").to_pylist()[3] == "c3"
    with pytest.raises(CacheMismatchError, match="fp-C.*fp-D"):
        read_centroids(path, fingerprint="fp-D")
    assert row_files(str(tmp_path)) == []  # centroids are not rows


# ---------------------------------------------------------------------------------------------
# views shared by teacher and student


def test_the_recipe_names_the_augment_function_that_makes_the_views():
    """The name every cache records resolves to the function itself (it named a moved module once)."""
    import importlib

    from teacher_service.contract.augment import augment_view

    module, _, name = RECIPE["function"].rpartition(".")
    assert getattr(importlib.import_module(module), name) is augment_view


def test_a_cache_recording_the_former_function_name_stays_readable(tmp_path):
    """Caches written before augment.py moved record "teacher_service.views.augment_view": the same
    function, so a run opens them, appends to them and compacts old and new files together."""
    former = {**RECIPE, "function": "teacher_service.views.augment_view"}
    write_shard_file(tmp_path / "train-000000.parquet", keys_(4), recipe=former)
    cache = EmbeddingCache.open(str(tmp_path), teacher_info=info(), recipe=RECIPE)
    assert len(cache) == 4
    write_shard_file(tmp_path / f"{APPEND_PREFIX}new-0-a.parquet", keys_(2, "n"), recipe=RECIPE)
    write_shard_file(tmp_path / f"{APPEND_PREFIX}old-0-b.parquet", keys_(2, "o"), recipe=former)
    assert compact(str(tmp_path)).rows_written == 4
    assert len(EmbeddingCache.open(str(tmp_path), recipe=RECIPE)) == 8
    with pytest.raises(CacheMismatchError, match="function 'teacher_service.views.augment_view' vs 'elsewhere.f'"):
        EmbeddingCache.open(str(tmp_path), recipe={**RECIPE, "function": "elsewhere.f"})


def test_digests_follow_pixels_and_fitted_tokens():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    d = image_digests(images)
    assert d.dtype == np.uint64 and len(set(d.tolist())) == 4
    changed = images.copy()
    changed[2, 0, 0, 0] ^= 1
    assert (image_digests(changed) != d).tolist() == [False, False, True, False]
    assert image_digests(images.reshape(4, 4, 16, 3))[0] != d[0]  # same bytes, other shape
    tokens = np.zeros((2, 20), np.int64)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, [5, 6], 49407
    # the same short caption tokenised at another context length fits to the same teacher tokens
    assert (token_digests(tokens, 16) == token_digests(tokens[:, :10], 16)).all()
    assert token_digests(tokens, 16)[0] != token_digests(tokens, 16)[1]


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "L"), ("PNG", "P"), ("JPEG", "RGB")])
def test_decode_image_matches_webdataset_training_decode(fmt, mode):
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    ext = "png" if fmt == "PNG" else "jpg"
    decoded = decode_rgb8(buf.getvalue())
    want = wds.Decoder([wds.imagehandler("rgb8")])({"__key__": "x", ext: buf.getvalue()})[ext]
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 10, 3)
    np.testing.assert_array_equal(decoded, want)


_APPENDER = """
import sys
sys.path.insert(0, sys.argv[2])
from teacher_service.cache.store import CacheAppender, EmbeddingCache
from test_cache import RECIPE, info, keys_, row_values

cache = EmbeddingCache.open(sys.argv[1], teacher_info=info(), recipe=RECIPE, create=True)
appender = CacheAppender(cache.path, cache.meta, run="killed", rank=0)
for batch in range(10**6):
    keys = keys_(4000, f"b{batch}")
    r = row_values(keys, 0)
    appender.add(keys, 0, r["image"], r["text"], r["idig"], r["tdig"])
    appender.flush()
    print(batch, flush=True)
"""


def _stopped(pid: int) -> bool:
    """True once the process is in the stopped state (SIGSTOP is delivered asynchronously)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def kill_mid_write(proc, root, timeout_s: float = 30.0) -> list[str]:
    """SIGKILL `proc` while it is writing a file: SIGSTOP it once a temporary file shows up, check
    (while it cannot run) that one is still there, then kill it; else let it go on and try again.
    Returns the temporary files that existed at the moment of the kill."""
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(".tmp-" in n for n in os.listdir(root)):
            continue
        proc.send_signal(signal.SIGSTOP)
        while not _stopped(proc.pid):
            time.sleep(0.001)
        writing = sorted(n for n in os.listdir(root) if ".tmp-" in n)
        if writing:
            proc.send_signal(signal.SIGKILL)
            return writing
        proc.send_signal(signal.SIGCONT)  # it had just renamed the file: catch the next one
    raise AssertionError(f"never caught the writer mid-write in {timeout_s:.0f} s")


def test_appender_killed_mid_write_leaves_only_whole_files(tmp_path):
    """SIGKILL a process that keeps appending (no chance to clean up) while it writes a file: the
    next reader opens the cache, sees only whole append files, and every row it serves is the row
    that was written; the file being written at the kill is left over and never read."""
    import subprocess
    import sys
    import time

    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(root), os.path.dirname(__file__)],
                            stdout=subprocess.PIPE, text=True)
    flushed = [proc.stdout.readline() for _ in range(3)]  # three whole files are on disk...
    assert all(line.strip() for line in flushed), flushed
    rows_dir = tmp_path / "cache" / TEACHERS_DIR / info()["fingerprint"]  # a new cache
    writing = kill_mid_write(proc, rows_dir)  # ...and the kill lands while a further one is being written
    proc.wait(timeout=30)
    proc.stdout.close()
    assert len(writing) == 1 and f".tmp-{proc.pid}-" in writing[0], writing

    cache = EmbeddingCache.open(str(root), teacher_info=info(), recipe=RECIPE)
    files = row_files(str(rows_dir))
    assert len(files) >= 3 and all(os.path.basename(f).startswith(APPEND_PREFIX) for f in files)
    assert len(cache) == 4000 * len(files) and cache.duplicates == 0
    keys = [k for batch in range(len(files)) for k in keys_(4000, f"b{batch}")]
    rows = cache.fetch(cache.locate(keys, view=0))
    expected = row_values(keys, 0)
    np.testing.assert_array_equal(rows["image_emb"], expected["image"])
    np.testing.assert_array_equal(rows["text_digest"], expected["tdig"])
    leftovers = [n for n in os.listdir(rows_dir) if ".tmp-" in n]
    assert leftovers == writing  # the torn file is still there, and the reader skipped it
    record("cache_appender_killed", {"whole_files": len(files), "rows_per_file": 4000, "rows_served": len(cache),
                                     "rows_equal_to_written": len(keys), "duplicates": cache.duplicates,
                                     "tmp_files_at_kill": len(writing), "tmp_files_left_unread": len(leftovers)})
    print(f"appender killed after {len(files)} whole files; {len(leftovers)} unfinished tmp file(s) left unread")
    # compaction sweeps what a dead writer left once it is old enough not to be a write in progress
    for name in leftovers:
        os.utime(rows_dir / name, (time.time() - 2 * 3600,) * 2)
    fresh = rows_dir / f"{APPEND_PREFIX}live-0-x.parquet.tmp-1-abcd"
    fresh.write_bytes(b"a write in progress")
    report = compact(str(root))
    assert sorted(os.path.basename(p) for p in report.stale_tmp_removed) == sorted(leftovers)
    assert fresh.exists() and report.rows_written == len(cache)
