"""`kd precompute` and `kd cache audit` on the shared local Ray cluster with a tiny teacher.

Precompute writes one Parquet file per shard whose rows are the live teacher's embeddings of
exactly the pixels and tokens the student's data pipeline produces for (key, epoch); a rerun
skips finished shards and redoes only a deleted or corrupt one; another teacher is refused; an
audit recomputes rows and agrees to cosine >= 0.999; centroids are per-class means.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from teacher_service.cache.store import CacheMismatchError, EmbeddingCache, column_matrix, read_centroids, read_meta
from teacher_service.config import ServingConfig, TeacherConfig
from tiny_models import tiny_teacher_overrides

pytestmark = pytest.mark.ray

TINY_TEACHER = tiny_teacher_overrides()
TEACHER = TeacherConfig(model="ViT-B-32", overrides=TINY_TEACHER, torch_threads=1,
                        serving=ServingConfig(num_cpus=0.5, app_name="kd-teacher-precompute-test", max_batch_size=64,
                                              expected_request_samples=16))
VIEWS = 2
SEED = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    from student_trainer.data.write_shards import write_digits_shards

    out = tmp_path_factory.mktemp("digits")
    summary = write_digits_shards(out, image_size=32, samples_per_shard=100)
    return summary["train"].shards[:2]


@pytest.fixture(scope="module")
def engine():
    from teacher_service.serve.engine import TeacherEngine
    from teacher_service.model import load_teacher

    return TeacherEngine(load_teacher(TEACHER))


@pytest.fixture(scope="module")
def cache_dir(ray_cluster, shards, tmp_path_factory) -> Path:
    from teacher_service.cache.precompute import precompute

    out = tmp_path_factory.mktemp("cache")
    summary = precompute(shards, str(out), views=VIEWS, teacher=TEACHER, seed=SEED, image_size=32,
                         num_cpus=0.5, concurrency=1, batch_size=50, progress=False)
    assert summary.computed == shards and summary.skipped == [] and summary.rows == 2 * 100 * VIEWS
    assert summary.teacher_s > 0
    assert summary.out == str(out / "teachers" / summary.fingerprint)  # the teacher's own rows in the root
    return Path(summary.out)  # a teacher's directory: what a one-teacher cache was, and still reads as


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_one_file_per_shard_with_teacher_metadata(cache_dir, shards, engine):
    assert sorted(os.listdir(cache_dir)) == ["train-000000.parquet", "train-000001.parquet"]
    table = pq.read_table(cache_dir / "train-000001.parquet")
    assert table.num_rows == 100 * VIEWS
    assert sorted(set(table.column("view").to_pylist())) == list(range(VIEWS))
    meta = read_meta(str(cache_dir / "train-000001.parquet"))
    info = engine.teacher.info()
    assert meta["fingerprint"] == info["fingerprint"] and meta["teacher"]["preprocess"] == info["preprocess"]
    assert meta["recipe"] == {"function": "teacher_service.contract.augment.augment_view", "version": "1", "image_size": 32,
                              "seed": SEED, "train": True, "tokenizer": "ViT-B-32", "context_length": 16}
    assert meta["source"] == shards[1] and meta["views"] == VIEWS and meta["dtype"] == "float16"
    assert meta["teacher_config"] == TEACHER.replica_dict() and "grpc" not in meta["teacher_config"]


@pytest.mark.parametrize("epoch", range(VIEWS))
def test_cached_rows_are_the_teacher_on_the_student_pixels(cache_dir, shards, engine, epoch):
    """Rows match the live teacher on the exact batches student_trainer.data.batches yields for that epoch."""
    from student_trainer.config import ModelConfig
    from student_trainer.data.batches import train_batches
    from student_trainer.factory import create_student, create_tokenizer
    from teacher_service.contract.protocol import EmbedRequest
    from teacher_service.contract.augment import image_digests, token_digests

    student_cfg = ModelConfig(name="digits-student")
    tokenizer = create_tokenizer(create_student(student_cfg), student_cfg)
    batch = next(iter(train_batches(shards, rank=0, world_size=1, batch_size=24, image_size=32, epoch=epoch,
                                    seed=SEED, tokenizer=tokenizer, shuffle_buffer=50)))
    cache = EmbeddingCache.open(str(cache_dir))
    locs = cache.locate(batch.keys, epoch)
    assert None not in locs
    rows = cache.fetch(locs)
    np.testing.assert_array_equal(rows["image_digest"], image_digests(batch.images))  # same pixels
    np.testing.assert_array_equal(rows["text_digest"], token_digests(batch.tokens, 16))  # same tokens
    live = engine.embed(EmbedRequest(keys=batch.keys, images=batch.images, tokens=batch.tokens))
    assert _cosine(rows["image_emb"], live.image_features).min() >= 0.999
    assert _cosine(rows["text_emb"], live.text_features).min() >= 0.999
    other = cache.fetch(cache.locate(batch.keys, 1 - epoch))  # the other view: other pixels
    assert (other["image_digest"] != rows["image_digest"]).all()
    assert _cosine(other["image_emb"], live.image_features).mean() < 0.999
    np.testing.assert_array_equal(other["text_emb"], rows["text_emb"])  # captions do not change


def test_audit_agrees_with_live_teacher(cache_dir):
    from teacher_service.cache.audit import audit_cache

    report = audit_cache(str(cache_dir), samples=40, seed=1)  # teacher: the config the cache recorded
    assert report.rows == 40 and report.unlocatable == 0 and report.digest_mismatches == 0
    assert report.worst_image_cosine >= 0.999 and report.worst_text_cosine >= 0.999 and report.ok
    assert {"key", "view", "shard"} <= set(report.worst_row)


def test_audit_detects_a_tampered_row(cache_dir, tmp_path):
    """The audit can fail: a cache whose embeddings were swapped between rows is caught."""
    import shutil

    from teacher_service.cache.store import rows_table, write_table_atomic
    from teacher_service.cache.audit import audit_cache

    bad = tmp_path / "tampered"
    shutil.copytree(cache_dir, bad)
    path = str(bad / "train-000000.parquet")
    table = pq.read_table(path)
    meta = read_meta(path)
    image = column_matrix(table, "image_emb")[::-1]  # every row now holds another row's embedding
    write_table_atomic(rows_table(meta, table.column("key").to_pylist(), table.column("view").to_numpy(), image,
                                  column_matrix(table, "text_emb"), table.column("image_digest").to_numpy(),
                                  table.column("text_digest").to_numpy()), path)
    report = audit_cache(str(bad), samples=60, seed=2)
    assert not report.ok and report.worst_image_cosine < 0.99 and report.worst_row["shard"].endswith("000000.tar")


def test_audit_refuses_another_teacher(cache_dir):
    from teacher_service.cache.audit import audit_cache

    other = TeacherConfig.from_dict({**TEACHER.to_dict(), "seed": 1})
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        audit_cache(str(cache_dir), teacher=other, samples=4)


def test_resume_recomputes_only_missing_and_corrupt_shards(cache_dir, shards, tmp_path):
    import shutil

    from teacher_service.cache.precompute import precompute

    work = tmp_path / "resume"
    shutil.copytree(cache_dir, work)
    kept = work / "train-000000.parquet"
    before = (kept.stat().st_ino, kept.stat().st_mtime_ns)
    original = pq.read_table(work / "train-000001.parquet")
    os.unlink(work / "train-000001.parquet")
    summary = precompute(shards, str(work), views=VIEWS, teacher=TEACHER, seed=SEED, num_cpus=0.5,
                         batch_size=50, progress=False)
    assert summary.computed == [shards[1]] and summary.skipped == [shards[0]] and summary.rows == 100 * VIEWS
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == before  # untouched
    redone = pq.read_table(work / "train-000001.parquet")
    assert redone.column("key").to_pylist() == original.column("key").to_pylist()
    assert _cosine(column_matrix(redone, "image_emb"), column_matrix(original, "image_emb")).min() >= 0.999
    # a truncated file is reported and recomputed; everything else is skipped
    kept.write_bytes(kept.read_bytes()[:1000])
    summary = precompute(shards, str(work), views=VIEWS, teacher=TEACHER, seed=SEED, num_cpus=0.5,
                         batch_size=50, progress=False)
    assert summary.recomputed == [shards[0]] and summary.computed == [shards[0]] and summary.skipped == [shards[1]]
    assert len(EmbeddingCache.open(str(work))) == 2 * 100 * VIEWS
    assert not [n for n in os.listdir(work) if ".tmp-" in n]
    # other teacher or another seed: refused naming both fingerprints / the recipe field
    other = TeacherConfig.from_dict({**TEACHER.to_dict(), "seed": 1})
    with pytest.raises(CacheMismatchError, match=f"{summary.fingerprint}.*fingerprint"):
        precompute(shards, str(work), views=VIEWS, teacher=other, seed=SEED, num_cpus=0.5, progress=False)
    with pytest.raises(CacheMismatchError, match="seed 3 vs 4"):
        precompute(shards, str(work), views=VIEWS, teacher=TEACHER, seed=SEED + 1, num_cpus=0.5, progress=False)


def test_class_centroids_are_per_class_means(shards, engine, tmp_path):
    import hashlib

    from teacher_service.cache.precompute import precompute_centroids
    from teacher_service.contract.augment import augment_view
    from teacher_service.contract.protocol import EmbedRequest
    from teacher_service.shards import read_samples

    path = precompute_centroids(shards, str(tmp_path), 3, teacher=TEACHER, image_size=32, seed=5)
    centroids, meta = read_centroids(path, fingerprint=engine.teacher.fingerprint)
    assert centroids.shape == (10, 48) and meta["writer"]["per_class"] == 3 and meta["writer"]["seed"] == 5
    assert pq.read_table(path).column("name").to_pylist()[:2] == ["zero", "one"]
    # class 7 by hand: 3 samples labelled 7 drawn with seed 5 (first in sha256(seed, key) order), plain views
    sevens = [s for s in read_samples(shards) if s["cls"] == 7]
    picked = sorted(sevens, key=lambda s: hashlib.sha256(f"5\x00{s['__key__']}".encode()).digest()[:8][::-1])[:3]
    assert [s["__key__"] for s in picked] != [s["__key__"] for s in sevens[:3]]  # not the first 3 in shard order
    images = np.stack([augment_view(s["image"], s["__key__"], 0, 0, 32, train=False) for s in picked])
    live = engine.embed(EmbedRequest(keys=["a", "b", "c"], images=images)).image_features.astype(np.float32)
    np.testing.assert_allclose(centroids[7], live.mean(0), atol=2e-3)
    assert not np.allclose(centroids[7], centroids[1], atol=1e-2)


def test_cli_precompute_through_a_running_app_then_audit(ray_cluster, shards, engine, tmp_path, capsys):
    """`kd precompute --app-name` (teacher actors call the Serve app) and `kd cache info/audit/compact`."""
    from ray import serve

    from cluster.cli import main
    from teacher_service.app import deploy

    deploy(TEACHER).info.remote().result(timeout_s=120)
    try:
        out = tmp_path / "via-app"
        rc = main(["precompute", "--app-name", TEACHER.serving.app_name, "--shards", shards[0], "--out", str(out),
                   "--views", "1", "--seed", str(SEED), "--batch-size", "50", "--json"])
        assert rc == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["computed"] == [shards[0]] and summary["fingerprint"] == engine.teacher.fingerprint
        meta = read_meta(str(out / "teachers" / summary["fingerprint"] / "train-000000.parquet"))
        assert meta["app_name"] == TEACHER.serving.app_name and meta["teacher_config"] is None
        rc = main(["cache", "audit", str(out), "--samples", "10", "--app-name", TEACHER.serving.app_name, "--json"])
        report = json.loads(capsys.readouterr().out)
        assert rc == 0 and report["ok"] and report["worst_image_cosine"] >= 0.999
        int8 = tmp_path / "via-app-int8"  # the same rows stored as int8
        args = ["precompute", "--app-name", TEACHER.serving.app_name, "--shards", shards[0], "--out", str(int8),
                "--views", "1", "--seed", str(SEED), "--batch-size", "50", "--json"]
        assert main(args + ["--answer-dtype", "int8"]) == 0
        assert json.loads(capsys.readouterr().out)["answer_dtype"] == "int8"
        assert main(args + ["--answer-dtype", "bf16"]) == 2  # one cache, one dtype
        assert "stores this teacher's rows in int8; --answer-dtype bf16 would mix dtypes" in capsys.readouterr().err
    finally:
        serve.delete(TEACHER.serving.app_name)
    # the app is gone and the cache recorded no config: the audit says what to pass instead
    assert main(["cache", "audit", str(out), "--samples", "4"]) == 2
    assert "--app-name" in capsys.readouterr().err
    yaml_path = tmp_path / "teacher.yaml"
    TEACHER.to_yaml(yaml_path)
    assert main(["cache", "audit", str(out), "--samples", "4", "--teacher-config", str(yaml_path)]) == 0
    capsys.readouterr()
    assert main(["cache", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 100 and info["views"] == [0] and info["embed_dim"] == 48
    assert 4 * 48 <= info["bytes_per_row"] <= 4 * 48 + 200 and info["answer_dtype"] == "fp16"
    assert main(["cache", "info", str(int8), "--json"]) == 0
    info8 = json.loads(capsys.readouterr().out)
    assert info8["answer_dtype"] == "int8" and info8["rows"] == 100 and info8["bytes"] < 0.75 * info["bytes"]
    full, small = EmbeddingCache.open(str(out)), EmbeddingCache.open(str(int8))
    keys = sorted(k for k, _ in full.index)
    a, b = full.fetch(full.locate(keys, 0)), small.fetch(small.locate(keys, 0))
    np.testing.assert_array_equal(a["image_digest"], b["image_digest"])
    for name in ("image_emb", "text_emb"):  # int8 decodes within half a step (max |x| / 127 / 2) of fp16
        assert b[name].dtype == np.float32 and _cosine(b[name], a[name]).min() > 0.9999
        step = np.abs(a[name].astype(np.float32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(b[name] - a[name].astype(np.float32)) <= step / 2 + 1e-6).all()


# a teacher slow enough (~2 s a shard of 100 samples x 4 views here) that `kd precompute` is
# caught between its first and its last shard file
SLOW_TEACHER = {"embed_dim": 48, "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 4,
                                                "head_width": 32},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
KILL_SHARDS, KILL_VIEWS = 6, 4


def _precompute_argv(work: Path) -> list[str]:
    """`kd precompute`'s arguments for KILL_SHARDS shards of `work`'s data with the slow teacher."""
    return ["precompute", "--teacher-config", str(work / "teacher.yaml"),
            "--shards", str(work / "data" / f"train-{{000000..{KILL_SHARDS - 1:06d}}}.tar"), "--out",
            str(work / "cache"), "--views", str(KILL_VIEWS), "--seed", str(SEED), "--batch-size", "50", "--json"]


def _kd_precompute(work: Path, ray_tmp: str, log: str):
    """`python -m cluster.cli precompute` in its own process and its own embedded Ray cluster (temp
    dir `ray_tmp`, so its processes can be found and stopped): the one to kill."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cluster.cli", *_precompute_argv(work)]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": "",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    with open(work / f"{log}.out", "w") as out, open(work / f"{log}.err", "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=work)


def _rows_dir(root: Path) -> Path | None:
    """The one teacher's directory of the cache root (None before precompute made it)."""
    found = sorted((root / "teachers").glob("*"))
    return found[0] if found else None


def _kill_between_shards(proc, root: Path, timeout_s: float = 300.0) -> dict[str, tuple[int, int]]:
    """SIGKILL `proc` once at least one shard file exists and not all: SIGSTOP it at the first
    file, list the files while it cannot run, then kill it. Returns {file: (inode, mtime_ns)}."""
    import signal
    import time

    from test_cache import _stopped

    deadline = time.monotonic() + timeout_s
    while not ((cache := _rows_dir(root)) and any(n.endswith(".parquet") for n in os.listdir(cache))):
        assert proc.poll() is None, f"kd precompute ended (rc {proc.returncode}) before writing a shard"
        assert time.monotonic() < deadline, "no shard file after the timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)
    while not _stopped(proc.pid):
        time.sleep(0.001)
    done = {n: ((cache / n).stat().st_ino, (cache / n).stat().st_mtime_ns)
            for n in os.listdir(cache) if n.endswith(".parquet")}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return done


def test_precompute_killed_between_shards_resumes_without_loss_or_duplicates(ray_cluster, tmp_path, capsys):
    """SIGKILL a running `kd precompute` (its driver, in a process and Ray cluster of its own; no
    chance to clean up) after some shard files exist, then rerun it (the same command, here on the
    session's cluster: what a rerun resumes from is the cache on disk, not the cluster): the rerun
    skips exactly the finished shards (left untouched), computes the rest, and the cache then holds
    every sample x view once, each file whole; a temporary file the kill left is never read."""
    import shutil
    import tempfile

    from cluster.cli import main
    from own_processes import stop_own_processes
    from reliability_record import record
    from student_trainer.data.write_shards import write_digits_shards
    from teacher_service.shards import read_samples

    write_digits_shards(tmp_path / "data", image_size=32, samples_per_shard=100)
    TeacherConfig(model="ViT-B-32", overrides=SLOW_TEACHER, torch_threads=1,
                  serving=ServingConfig(num_cpus=0.5)).to_yaml(
        tmp_path / "teacher.yaml")
    shards = [str(tmp_path / "data" / f"train-{i:06d}.tar") for i in range(KILL_SHARDS)]
    cache = tmp_path / "cache"
    ray_tmp = tempfile.mkdtemp(prefix="kdpk-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        done = _kill_between_shards(_kd_precompute(tmp_path, ray_tmp, "killed"), cache)
        cache = _rows_dir(cache)
        leftovers = sorted(n for n in os.listdir(cache) if ".tmp-" in n)
        stray = stop_own_processes(ray_tmp)  # the killed driver's cluster, if it outlived it (counted, recorded)
        assert 0 < len(done) < KILL_SHARDS, done
    finally:
        stop_own_processes(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    capsys.readouterr()
    rc = main(_precompute_argv(tmp_path))
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    summary = json.loads(out)
    finished = {str(tmp_path / "data" / n.replace(".parquet", ".tar")) for n in done}
    assert set(summary["skipped"]) == finished and summary["recomputed"] == []
    assert sorted(summary["computed"] + summary["skipped"]) == shards
    assert summary["rows"] == 100 * KILL_VIEWS * (KILL_SHARDS - len(done))
    assert {n: ((cache / n).stat().st_ino, (cache / n).stat().st_mtime_ns) for n in done} == done  # untouched
    # every shard file whole (checksums verified) with exactly its samples x views, nothing twice
    for shard in shards:
        path = cache / os.path.basename(shard).replace(".tar", ".parquet")
        table = pq.read_table(path, page_checksum_verification=True)
        keys = {s["__key__"] for s in read_samples([shard])}
        pairs = list(zip(table.column("key").to_pylist(), table.column("view").to_pylist()))
        samples = read_meta(str(path))["writer"]["samples"]
        assert len(pairs) == len(set(pairs)) == len(keys) * KILL_VIEWS == samples * KILL_VIEWS
        assert {k for k, _ in pairs} == keys and {v for _, v in pairs} == set(range(KILL_VIEWS))
    opened = EmbeddingCache.open(str(cache))
    assert len(opened) == 100 * KILL_SHARDS * KILL_VIEWS and opened.duplicates == 0
    assert all(f.endswith(".parquet") for f in opened.files) and len(opened.files) == KILL_SHARDS
    assert sorted(n for n in os.listdir(cache) if ".tmp-" in n) == leftovers  # what the kill left, unread
    figures = {"shards": KILL_SHARDS, "views": KILL_VIEWS, "samples_per_shard": 100,
               "shard_files_at_kill": len(done), "tmp_files_left_by_kill": len(leftovers),
               "stray_processes_after_kill": len(stray), "rerun_skipped": len(summary["skipped"]),
               "rerun_computed": len(summary["computed"]), "rerun_recomputed": len(summary["recomputed"]),
               "rows_in_cache": len(opened), "duplicate_rows": opened.duplicates}
    record("precompute_killed", figures)
    print(f"kd precompute killed with {len(done)}/{KILL_SHARDS} shard files written; rerun skipped "
          f"{len(summary['skipped'])}, computed {len(summary['computed'])}; cache {len(opened)} rows, 0 duplicates")
