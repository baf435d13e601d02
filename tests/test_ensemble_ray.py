"""Several teachers on the live local Ray cluster: two tiny teacher apps of different widths, one
two-worker run distilling from both (the second asked only for digits 0-4), both pools reporting
the run's samples, `kd teacher status` over both pools, and the checkpoint recording both teachers;
both in hybrid mode, each filling its own rows of one cache root."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import running_app, shared_teacher, tiny_app_config, train_shards

from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig

pytestmark = pytest.mark.ray

APPS = (shared_teacher().serving.app_name, "kd-ensemble-narrow")  # wide (48): the session's app, tiny_teacher_app
BATCH, STEPS, WORKERS = 16, 3, 2
LOW_DIGITS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return train_shards(tmp_path_factory, name="digits-ensemble")


@pytest.fixture(scope="module")
def apps(tiny_teacher_app):
    """The wide teacher is the session's shared app (the tests count its samples by run name)."""
    with running_app(tiny_app_config(APPS[1], 32, BATCH)) as narrow:
        yield tiny_teacher_app, narrow


def ensemble_cfg(shards: str, storage: Path, run: str, sources: list[dict]) -> TrainConfig:
    return TrainConfig(
        run_name=run, storage_path=str(storage), model=ModelConfig(name="digits-student"),
        data=DataConfig(train_shards=shards, image_size=32, batch_size=BATCH, shuffle_buffer=50),
        teacher=TeacherSourceConfig(mode="remote", timeout_s=60.0, retries=1, sources=sources),
        losses={"clip": 1.0, "kl": 1.0, "fd": 100.0, "icl": 1.0}, optim=OptimConfig(lr=1e-3, warmup_steps=1),
        epochs=1, max_steps_per_epoch=STEPS, num_workers=WORKERS, cpus_per_worker=1, torch_threads=1,
        log_every_steps=0, seed=0)


def low_digit_samples(shards: str) -> int:
    """How many of the run's samples (both ranks, STEPS batches each) are digits 0-4."""
    from student_trainer.data.batches import train_batches
    from student_trainer.factory import create_student, create_tokenizer
    from teacher_service.shards import resolve_shards

    mc = ModelConfig(name="digits-student")
    tokenizer = create_tokenizer(create_student(mc), mc)
    count = 0
    for rank in range(WORKERS):
        batches = train_batches(resolve_shards(shards), rank=rank, world_size=WORKERS, batch_size=BATCH,
                                image_size=32, epoch=0, seed=0, tokenizer=tokenizer, shuffle_buffer=50)
        count += sum(int(np.isin(b.labels, LOW_DIGITS).sum()) for _, b in zip(range(STEPS), batches))
    return count


def test_one_run_distills_from_two_pools_of_different_widths(shards, apps, tmp_path, capsys):
    from cluster.cli import main
    from student_trainer.checkpoint import PROVENANCE_FILE, TeacherChangedError
    from student_trainer.preflight import check_run
    from student_trainer.train import run_training
    from teacher_service.app import collect_stats

    wide, narrow = apps
    infos = [h.info.remote().result(timeout_s=60) for h in apps]
    assert [i["embed_dim"] for i in infos] == [48, 32]
    run = "ensemble-run"
    sources = [{"name": "wide", "app_name": APPS[0]},
               {"name": "narrow", "app_name": APPS[1], "labels": LOW_DIGITS, "loss_weight": 2.0}]
    result = run_training(ensemble_cfg(shards, tmp_path / "runs", run, sources))

    metrics = result.metrics
    assert np.isfinite(metrics["loss"]) and metrics["teacher_mode"] == "ensemble"
    assert metrics["teacher_fingerprint"] == f"narrow={infos[1]['fingerprint']},wide={infos[0]['fingerprint']}"
    expected_low = low_digit_samples(shards)
    assert 0 < expected_low < WORKERS * STEPS * BATCH
    pools = [collect_stats(h)["runs"][run] for h in apps]
    assert pools[0]["samples"] == WORKERS * STEPS * BATCH  # the wide teacher answered every sample
    assert pools[1]["samples"] == expected_low  # the narrow one only digits 0-4: the others were not sent
    assert metrics["teacher_wide_samples"] == STEPS * BATCH  # rank 0's own count

    record = json.loads((Path(result.checkpoint.path) / PROVENANCE_FILE).read_text())
    assert [(t["name"], t["fingerprint"], t["labels"]) for t in record["teachers"]] == [
        ("wide", infos[0]["fingerprint"], None), ("narrow", infos[1]["fingerprint"], LOW_DIGITS)]

    swapped = [{"name": "wide", "app_name": APPS[1]}, {"name": "narrow", "app_name": APPS[0], "labels": LOW_DIGITS}]
    with pytest.raises(TeacherChangedError, match="its teachers changed"):
        check_run(ensemble_cfg(shards, tmp_path / "runs", run, swapped))  # resuming with the pools swapped

    capsys.readouterr()
    assert main(["teacher", "status", "--app-name", APPS[0], "--app-name", APPS[1]]) == 0
    text = capsys.readouterr().out
    assert f"== teacher app {APPS[0]!r}" in text and f"== teacher app {APPS[1]!r}" in text
    assert text.count(run) >= 2
    assert main(["teacher", "status", "--app-name", APPS[0], "--app-name", APPS[1], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [report[a]["stats"]["runs"][run]["samples"] for a in APPS] == [pools[0]["samples"], expected_low]


def test_an_app_and_a_cache_of_another_teacher_train_together(shards, apps, tmp_path):
    """One teacher served, one precomputed (each its own width): the cache answers every sample with
    no pool behind it, the app the rest of the ensemble; both teachers are in the checkpoint."""
    from student_trainer.checkpoint import PROVENANCE_FILE
    from student_trainer.train import run_training
    from teacher_service.cache.precompute import precompute
    from teacher_service.shards import resolve_shards

    cache = tmp_path / "narrow-cache"
    precompute(resolve_shards(shards), str(cache), views=1, teacher=tiny_app_config("unused", 32, BATCH),
               image_size=32, seed=0, num_cpus=0.5, batch_size=50, progress=False)
    sources = [{"name": "wide", "app_name": APPS[0]}, {"name": "cached", "mode": "cache", "cache_path": str(cache)}]
    cfg = ensemble_cfg(shards, tmp_path / "runs", "ensemble-cache-run", sources)
    cfg.num_workers, cfg.data.num_views = 1, 1
    result = run_training(cfg)
    metrics = result.metrics
    assert np.isfinite(metrics["loss"])
    assert metrics["teacher_cache_hits"] == STEPS * BATCH and metrics["teacher_cache_misses"] == 0
    assert metrics["teacher_wide_samples"] == STEPS * BATCH and metrics["teacher_cached_samples"] == 0
    record = json.loads((Path(result.checkpoint.path) / PROVENANCE_FILE).read_text())
    assert [(t["name"], t["mode"]) for t in record["teachers"]] == [("wide", "remote"), ("cached", "cache")]


def test_two_hybrid_teachers_fill_their_own_rows_of_one_cache_root(shards, apps, tmp_path):
    """Both apps in hybrid mode over one cache root: each misses every sample of a fresh root, and its
    answers are appended under its own fingerprint, at its own width."""
    from student_trainer.train import run_training
    from teacher_service.cache import EmbeddingCache, cache_teachers

    root = tmp_path / "shared-cache"
    sources = [{"name": "wide", "app_name": APPS[0]}, {"name": "narrow", "app_name": APPS[1]}]
    cfg = ensemble_cfg(shards, tmp_path / "runs", "ensemble-hybrid-run", sources)
    cfg.teacher.mode, cfg.teacher.cache_path = "hybrid", str(root)
    cfg.num_workers, cfg.data.num_views = 1, 1
    metrics = run_training(cfg).metrics
    assert np.isfinite(metrics["loss"])
    assert metrics["teacher_cache_misses"] == metrics["teacher_cache_appends"] == 2 * STEPS * BATCH
    infos = [h.info.remote().result(timeout_s=60) for h in apps]
    assert sorted(cache_teachers(str(root))) == sorted(i["fingerprint"] for i in infos)
    for info in infos:
        cache = EmbeddingCache.open(str(root), teacher=info["fingerprint"])
        assert len(cache) == STEPS * BATCH and cache.embed_dim == info["embed_dim"]
