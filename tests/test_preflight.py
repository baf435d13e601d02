"""Configuration errors fail on the driver, once, with one clear message, before any worker starts."""
from __future__ import annotations

import pytest
from tiny_models import tiny_teacher_overrides, train_shards

from student_trainer.config import DataConfig, ModelConfig, TeacherSourceConfig, TrainConfig
from student_trainer.preflight import check_run
from teacher_service.cache import CacheMismatchError
from teacher_service.config import TeacherConfig

TEACHER = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return train_shards(tmp_path_factory, samples_per_shard=40, name="preflight")


@pytest.fixture(scope="module")
def cache(ray_cluster, shards, tmp_path_factory):
    """TEACHER's rows of the first shard (one view, seed 0): read by the tests below, never written."""
    from teacher_service.cache.precompute import precompute
    from teacher_service.shards import resolve_shards

    out = tmp_path_factory.mktemp("preflight-cache")
    precompute(resolve_shards(shards)[:1], str(out), views=1, teacher=TEACHER, image_size=32, seed=0, num_cpus=0.5,
               progress=False)
    return out


def cfg_for(shards: str, tmp_path, mode: str = "none", losses=None, cache=None, **kwargs) -> TrainConfig:
    return TrainConfig(run_name="preflight", storage_path=str(tmp_path / "runs"), model=ModelConfig(name="digits-student"),
                       data=DataConfig(train_shards=shards, image_size=32, batch_size=8),
                       teacher=TeacherSourceConfig(mode=mode, cache_path=str(cache) if cache else None,
                                                   app_name="kd-no-such-app", timeout_s=0.5),
                       losses=losses or {"clip": 1.0}, num_workers=1, **kwargs)


def test_bad_losses_are_refused(shards, tmp_path):
    with pytest.raises(ValueError, match=r"unknown loss names \['kd'\]"):
        check_run(cfg_for(shards, tmp_path, losses={"clip": 1.0, "kd": 1.0}))
    with pytest.raises(ValueError, match=r"losses \['kl'\] need a teacher, but teacher.mode is 'none'"):
        check_run(cfg_for(shards, tmp_path, losses={"clip": 1.0, "kl": 1.0}))
    check_run(cfg_for(shards, tmp_path))  # clip alone needs nothing


def test_missing_or_empty_cache_is_refused(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: run `kd precompute` first"):
        check_run(cfg_for(shards, tmp_path, "cache", {"clip": 1.0, "kl": 1.0}, cache=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no row files"):
        check_run(cfg_for(shards, tmp_path, "cache", {"clip": 1.0, "kl": 1.0}, cache=tmp_path / "empty"))


def test_cache_of_another_recipe_and_embed_kd_without_centroids(cache, shards, tmp_path):
    with pytest.raises(CacheMismatchError, match="seed"):
        check_run(cfg_for(shards, tmp_path, "cache", {"clip": 1.0, "kl": 1.0}, cache=cache, seed=3))
    check_run(cfg_for(shards, tmp_path, "cache", {"clip": 1.0, "kl": 1.0}, cache=cache))
    with pytest.raises(ValueError, match=r"embed_kd needs class centroids.*kd precompute --class-centroids"):
        check_run(cfg_for(shards, tmp_path, "cache", {"clip": 1.0, "embed_kd": 1.0}, cache=cache))


def test_absent_teacher_app_is_refused_naming_it(ray_cluster, shards, tmp_path):
    from teacher_service.app import TeacherUnavailableError

    with pytest.raises(TeacherUnavailableError, match="no running teacher app 'kd-no-such-app'"):
        check_run(cfg_for(shards, tmp_path, "remote", {"clip": 1.0, "kl": 1.0}))


def test_kd_train_on_an_empty_cache_prints_one_error_and_starts_nothing(shards, tmp_path, capsys):
    import ray

    from cluster.cli import main

    (tmp_path / "empty").mkdir()
    was_up = ray.is_initialized()
    code = main(["train", "--train-shards", shards, "--teacher-mode", "cache", "--cache-path", str(tmp_path / "empty"),
                 "--loss", "clip", "--loss", "kl", "--run-name", "empty-cache", "--storage-path", str(tmp_path),
                 "--batch-size", "8", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kd: error: embedding cache ")
    assert ray.is_initialized() == was_up  # refused before a cluster (let alone a worker) started


def test_resuming_against_another_teacher_is_refused_naming_both(cache, shards, tmp_path):
    """A checkpoint records the teacher it was distilled from; a rerun with another one is refused on the driver."""
    import json

    from student_trainer.checkpoint import TeacherChangedError
    from teacher_service.cache import EmbeddingCache

    fingerprint = EmbeddingCache.open(str(cache)).fingerprint
    checkpoint = tmp_path / "runs" / "preflight" / "checkpoint_2026-12-02_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "provenance.json").write_text(json.dumps(
        {"teacher": {"fingerprint": "0123456789abcdef", "model": "ViT-L-14", "mode": "remote"}, "losses": {}}))
    cfg = cfg_for(shards, tmp_path, "cache", {"clip": 1.0, "kl": 1.0}, cache=cache)
    with pytest.raises(TeacherChangedError, match=f"'0123456789abcdef'.*ViT-L-14.*'{fingerprint}'"):
        check_run(cfg)
    cfg.teacher.allow_teacher_change = True
    check_run(cfg)
    (checkpoint / "provenance.json").write_text(json.dumps({"teacher": {"fingerprint": fingerprint}}))
    cfg.teacher.allow_teacher_change = False
    check_run(cfg)  # the same teacher resumes


def test_references_only_against_a_teacher_that_reads_no_shards_are_refused(shards, tmp_path, monkeypatch):
    import student_trainer.preflight as preflight

    monkeypatch.setattr(preflight, "_check_app", lambda cfg: {"fingerprint": "fp", "by_reference": False})
    cfg = cfg_for(shards, tmp_path, "remote", {"clip": 1.0, "kl": 1.0})
    cfg.teacher.send_pixels = "reference"
    with pytest.raises(ValueError, match="reads no shards"):
        check_run(cfg)
    cfg.teacher.send_pixels = "auto"  # auto sends pixels to such a teacher
    check_run(cfg)
