"""A run's configuration checked against the world on the driver, once, before any worker starts.

Ray Train restarts the worker group after a failure (`max_failures`): right for a dead worker or
replica, wrong for a configuration mistake, which fails the same way every time. Everything a run
can know is wrong before it trains (shards, loss names, an empty or missing cache, a cache of
another teacher or recipe, a teacher app that is not deployed, Embed-KD without centroids, a
student that cannot inherit the teacher's weights, `send_pixels: reference` against a teacher that
reads no shards) is refused here with one clear message; `run_training` calls it first.
"""
from __future__ import annotations

import os
from pathlib import Path

from student_trainer.config import TrainConfig
from student_trainer.data.batches import steps_per_epoch
from student_trainer.losses import LOSSES
from student_trainer.teacher.sources import source_class
from teacher_service.contract.augment import view_recipe
from teacher_service.shards import resolve_shards


def check_run(cfg: TrainConfig) -> None:
    """Raise ValueError / FileNotFoundError / CacheError / TeacherUnavailableError naming what is wrong."""
    cfg.validate()
    source = source_class(cfg.teacher.mode)
    shards = resolve_shards(cfg.data.train_shards)
    steps_per_epoch(shards, world_size=cfg.num_workers, batch_size=cfg.data.batch_size)
    _check_losses(cfg, source)
    teacher_info = _check_app(cfg) if source.needs_app else None
    if teacher_info and cfg.teacher.send_pixels == "reference" and not teacher_info.get("by_reference"):
        raise ValueError(f"teacher.send_pixels 'reference': teacher app {cfg.teacher.app_name!r} reads no shards; "
                         "deploy it with shard_roots holding the training shards (kd teacher serve --shard-root), "
                         "or use send_pixels 'auto'")
    cache_fingerprint = _check_cache(cfg, source, teacher_info) if source.needs_cache else None
    fingerprint = (teacher_info or {}).get("fingerprint") or cache_fingerprint
    if source.mode == "none":
        fingerprint = ""
    if fingerprint is not None:  # inline: the worker checks, once it has loaded the teacher
        _check_resume_teacher(cfg, fingerprint)
    if cfg.model.init_from_teacher and _latest_checkpoint(cfg) is None:  # only a fresh run inherits
        from student_trainer.inherit import check_inheritable

        check_inheritable(cfg)  # shapes only: a student the teacher's weights cannot initialise fails here


def _latest_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint a rerun of this run name resumes (None: a fresh run, or storage the driver cannot list)."""
    from student_trainer.checkpoint import latest_checkpoint

    if "://" in cfg.storage_path:  # cloud storage: the worker finds out when it restores
        return None
    return latest_checkpoint(os.path.join(os.path.abspath(os.path.expanduser(cfg.storage_path)), cfg.run_name))


def _check_resume_teacher(cfg: TrainConfig, fingerprint: str) -> None:
    """A rerun of a run name resumes its latest checkpoint: refuse it against another teacher."""
    from student_trainer.checkpoint import check_same_teacher, read_provenance

    latest = _latest_checkpoint(cfg)  # on cloud storage the worker checks when it restores the checkpoint
    if latest is not None:
        check_same_teacher(read_provenance(latest), fingerprint, f"run {cfg.run_name!r} ({latest})",
                           cfg.teacher.allow_teacher_change)


def _check_losses(cfg: TrainConfig, source) -> None:
    unknown = sorted(set(cfg.losses) - set(LOSSES))
    if unknown:
        raise ValueError(f"unknown loss names {unknown} in losses {cfg.losses}; known: {sorted(LOSSES)}")
    active = [name for name, weight in cfg.losses.items() if weight]
    centroids_given = cfg.loss_options.get("class_centroids") is not None
    per_batch = [n for n in active if LOSSES[n].needs_teacher and not (n == "embed_kd" and centroids_given)]
    if per_batch and source.mode == "none":
        raise ValueError(f"losses {per_batch} need a teacher, but teacher.mode is 'none': choose inline, "
                         "remote, cache or hybrid, or drop them")
    if "embed_kd" in active and not centroids_given and not source.computes_centroids:
        from teacher_service.cache import CENTROIDS_FILE

        if not (source.needs_cache and os.path.isfile(os.path.join(cfg.teacher.cache_path, CENTROIDS_FILE))):
            raise ValueError(centroids_missing(cfg))


def _check_app(cfg: TrainConfig) -> dict:
    """The teacher app's info; TeacherUnavailableError naming the apps that do run when it is absent."""
    import ray

    from teacher_service.app import get_teacher_handle

    if not ray.is_initialized():
        return {}
    handle = get_teacher_handle(cfg.teacher.app_name, timeout_s=cfg.teacher.timeout_s)
    return handle.info.remote().result(timeout_s=cfg.teacher.timeout_s)


def _check_cache(cfg: TrainConfig, source, teacher_info: dict | None) -> str | None:
    """The cache exists and holds rows (cache mode), and was made by this teacher with this run's
    views; returns its teacher fingerprint (None: a hybrid run starting a new cache)."""
    from teacher_service.cache import EmbeddingCache

    recipe = view_recipe(cfg.data.image_size, cfg.seed)
    if source.mode == "hybrid" and not os.path.isdir(cfg.teacher.cache_path):
        return None  # hybrid starts a new cache
    cache = EmbeddingCache.open(cfg.teacher.cache_path, teacher_info=teacher_info or None, recipe=recipe,
                                create=source.mode == "hybrid")
    if source.mode == "cache" and len(cache) == 0:
        raise FileNotFoundError(f"embedding cache {cache.path} holds no rows: run `kd precompute` over "
                                f"{cfg.data.train_shards} first, or train with teacher.mode 'hybrid'")
    return cache.fingerprint


def centroids_missing(cfg: TrainConfig) -> str:
    """Why Embed-KD cannot start, and the three ways to give it centroids."""
    return (f"loss embed_kd needs class centroids: give loss_options.class_centroids, write them into the "
            f"cache (`kd precompute --class-centroids N --out {cfg.teacher.cache_path or 'CACHE'}`), or use a "
            f"running teacher (teacher.mode inline, remote or hybrid, not {cfg.teacher.mode!r}) to compute them")
