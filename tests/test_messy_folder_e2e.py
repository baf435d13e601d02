"""A real, messy photo folder end to end: `kd data folder` → `kd precompute` (2 views) → cache-mode
training → hybrid training → `kd cache audit` → `kd eval`, with the skip counts asserted at each step.

Every image format and mode the folder writer accepts (JPEG/PNG/WebP/TIFF/BMP/GIF; RGB, RGBA, L, 1,
P, I;16; 1x1, 2000x6 and 8x1200 pixels), broken and cut files, bad rows and paths leading out of the
folder; plus a shard from another tool with .webp/.tiff/.gif members and bad samples (Ray Data's
`read_webdataset` gives such shards one column per extension, which crashed precompute before).
"""
from __future__ import annotations

import json

import pytest
from messy_folder import FOLDER_SKIPS, FOREIGN_SKIPS, GOOD, make_folder, make_foreign_shard
from tiny_models import shared_teacher

from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig

pytestmark = pytest.mark.ray

TEACHER = shared_teacher()  # precompute's teacher, and the session's app (tiny_teacher_app) for hybrid
APP = TEACHER.serving.app_name


def _summed(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def _run(shards: str, storage, name: str, mode: str, cache, epochs: int, views: int,
         max_steps: int | None = 2) -> TrainConfig:
    return TrainConfig(
        run_name=name, storage_path=str(storage), model=ModelConfig(name="digits-student"),
        data=DataConfig(train_shards=shards, image_size=32, batch_size=4, shuffle_buffer=10, num_views=views),
        teacher=TeacherSourceConfig(mode=mode, cache_path=str(cache), app_name=APP, timeout_s=60.0, retries=1),
        losses={"clip": 1.0, "kl": 1.0, "fd": 100.0}, optim=OptimConfig(lr=1e-3, warmup_steps=1),
        epochs=epochs, max_steps_per_epoch=max_steps, num_workers=1, cpus_per_worker=1, torch_threads=1,
        log_every_steps=0, seed=0)


def test_messy_folder_through_every_teacher_mode(tiny_teacher_app, tmp_path, capsys):
    from cluster.cli import main
    from student_trainer.evaluate import evaluate_checkpoint
    from student_trainer.train import run_training
    from teacher_service.cache import EmbeddingCache

    images, captions = make_folder(tmp_path)
    data = tmp_path / "shards"
    assert main(["data", "folder", "--images", str(images), "--captions", str(captions), "--out", str(data),
                 "--max-shard-samples", "8"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {len(GOOD)} samples in 3 shards" in out
    assert "skipped " + str(sum(FOLDER_SKIPS.values())) + ": " + ", ".join(
        f"{k}={v}" for k, v in sorted(FOLDER_SKIPS.items())) in out
    usable = len(GOOD) + make_foreign_shard(data / "train-000003.tar")
    shards = str(data / "train-*.tar")

    # precompute, 2 views: every usable sample of every format, the foreign shard's bad ones counted
    teacher_yaml = tmp_path / "teacher.yaml"
    TEACHER.to_yaml(str(teacher_yaml))
    cache = tmp_path / "cache"
    assert main(["precompute", "--teacher-config", str(teacher_yaml), "--shards", shards, "--out", str(cache),
                 "--views", "2", "--image-size", "32", "--num-cpus", "0.5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == usable and summary["rows"] == 2 * usable
    assert summary["samples_skipped"] == FOREIGN_SKIPS and len(summary["computed"]) == 4
    assert len(EmbeddingCache.open(str(cache))) == 2 * usable
    # a rerun finds every shard done, the all-good ones and the one with skipped samples alike
    assert main(["precompute", "--teacher-config", str(teacher_yaml), "--shards", shards, "--out", str(cache),
                 "--views", "2", "--image-size", "32", "--num-cpus", "0.5", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert len(again["skipped"]) == 4 and again["computed"] == []

    # cache mode: no teacher runs; every batch's samples are cached; the reader skips what precompute skipped
    # (whole epochs: 6 batches of 4 need 24 samples of the 22 usable, so every shard is read in each)
    result = run_training(_run(shards, tmp_path / "runs", "messy-cache", "cache", cache, epochs=2, views=2,
                               max_steps=None))
    m = result.metrics
    assert m["step"] == 12 and m["teacher_samples"] == 0
    assert m["teacher_cache_misses"] == 0 and m["teacher_cache_hits"] == 12 * 4
    for reason, count in FOREIGN_SKIPS.items():
        assert m[f"data_skipped_{reason}"] >= count  # each pass over the foreign shard counts its bad samples

    # hybrid: view 2 is new, asked of the pool once and appended; views 0-1 still come from the cache
    result = run_training(_run(shards, tmp_path / "runs", "messy-hybrid", "hybrid", cache, epochs=3, views=3))
    m = result.metrics
    assert m["teacher_cache_appends"] == m["teacher_cache_misses"] == m["teacher_samples"] == 8
    assert m["teacher_cache_hits"] == 2 * 2 * 4
    assert len(EmbeddingCache.open(str(cache))) == 2 * usable + 8

    # audit: cached rows (precomputed and appended) agree with a live teacher on the same pixels
    assert main(["cache", "audit", str(cache), "--samples", "40", "--shards", shards, "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert audit["ok"] and audit["digest_mismatches"] == 0 and audit["rows"] == 40 and audit["unlocatable"] == 0

    # eval of the hybrid-trained student on the same messy shards: the usable samples, bad ones skipped
    with result.checkpoint.as_directory() as ckpt:
        metrics = evaluate_checkpoint(ckpt, shards)
    assert metrics["samples"] == usable and 0.0 <= metrics["zero_shot_top1"] <= 1.0
