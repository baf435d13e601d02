"""A run's configuration checked against the world on the driver, once, before any worker starts.

Ray Train restarts the worker group after a failure (`max_failures`): right for a dead worker or
replica, wrong for a configuration mistake, which fails the same way every time. Everything a run
can know is wrong before it trains (the student's model, shards, loss names, an empty or missing
cache, a cache of another teacher or recipe, a teacher app that is not deployed, Embed-KD without
centroids, a student that cannot inherit the teacher's weights, `send_pixels: reference` against a
teacher that reads no shards, a selection super-batch larger than a pool takes in one request) is refused here with one clear message; `run_training` calls it first.
"""
from __future__ import annotations

import os
from pathlib import Path

from student_trainer.config import TeacherSourceConfig, TrainConfig
from student_trainer.data.batches import steps_per_epoch
from student_trainer.factory import check_model_config
from student_trainer.losses import ENSEMBLE_AVERAGES, LOSSES, OPTION_DEFAULTS, losses_needing_teacher
from student_trainer.teacher.modes import TeacherMode
from student_trainer.teacher.outputs import ensemble_fingerprint
from teacher_service.contract.augment import view_recipe
from teacher_service.shards import resolve_shards


def check_run(cfg: TrainConfig) -> None:
    """Raise ValueError / FileNotFoundError / CacheError / TeacherUnavailableError naming what is wrong.

    With several teachers (`teacher.sources`) each is checked as a single one would be, and the
    errors name it."""
    cfg.validate()
    check_model_config(cfg.model)  # an inline teacher's model was checked when its TeacherConfig was built
    members = cfg.teacher.members()
    shards = resolve_shards(cfg.data.train_shards)
    steps_per_epoch(shards, world_size=cfg.num_workers, batch_size=cfg.selection.draw_size(cfg.data.batch_size))
    if cfg.teacher.is_ensemble:
        _check_ensemble(cfg)
    if cfg.eval_every_steps:
        _check_eval_shards(cfg)
    _check_losses(cfg, members)
    fingerprints = {m.name: _check_teacher(cfg, m) for m in members}
    if any(fp is None for fp in fingerprints.values()):
        pass  # inline (or a new hybrid cache): the worker checks, once it has loaded the teacher
    elif cfg.teacher.is_ensemble:
        _check_resume_teacher(cfg, ensemble_fingerprint(fingerprints))
    else:
        _check_resume_teacher(cfg, next(iter(fingerprints.values())))
    if cfg.model.init_from_teacher and _latest_checkpoint(cfg) is None:  # only a fresh run inherits
        from student_trainer.inherit import check_inheritable

        check_inheritable(cfg)  # shapes only: a student the teacher's weights cannot initialise fails here


def _check_teacher(cfg: TrainConfig, teacher: TeacherSourceConfig) -> str | None:
    """One teacher's app and cache; its fingerprint ("" without a teacher, None: known only in the worker)."""
    mode = teacher.mode
    teacher_info = _check_app(teacher) if mode.needs_app else None
    if teacher_info and teacher.send_pixels == "reference" and not teacher_info.get("by_reference"):
        raise ValueError(f"teacher.send_pixels 'reference': teacher app {teacher.app_name!r} reads no shards; "
                         "deploy it with shard_roots holding the training shards (kd teacher serve --shard-root), "
                         "or use send_pixels 'auto'")
    if teacher_info:
        _check_request_size(cfg, teacher, teacher_info)
    cache_fingerprint = _check_cache(cfg, teacher, teacher_info) if mode.reads_cache else None
    if not mode.gives_outputs:
        return ""
    return (teacher_info or {}).get("fingerprint") or cache_fingerprint


def _check_request_size(cfg: TrainConfig, teacher: TeacherSourceConfig, teacher_info: dict) -> None:
    """A batch goes to the pool as one request (with data selection: the whole super-batch, which
    the pool scores together): it must fit the app's `max_request_samples`."""
    size, limit = cfg.selection.draw_size(cfg.data.batch_size), teacher_info.get("max_request_samples")
    if limit is not None and size > int(limit):
        what = (f"selection.k {cfg.selection.k} × data.batch_size {cfg.data.batch_size} = {size}"
                if cfg.selection.active else f"data.batch_size {size}")
        raise ValueError(f"{what} samples go to teacher app {teacher.app_name!r} in one request, more than its "
                         f"max_request_samples {limit}: lower them, or serve the teacher with a larger "
                         "serving.max_request_samples")


def _check_ensemble(cfg: TrainConfig) -> None:
    """What several teachers cannot do (yet): one teacher's weights or centroids, losses that need
    every teacher row under per-sample teacher choice."""
    if cfg.model.init_from_teacher:
        raise ValueError("model.init_from_teacher takes one teacher's weights: not available with several "
                         "teacher.sources")
    active = {n for n, w in cfg.losses.items() if w}
    if "embed_kd" in active:
        raise ValueError("loss embed_kd takes one teacher's class centroids: not available with several "
                         "teacher.sources")
    routed = [m.name for m in cfg.teacher.members() if m.labels is not None]
    refused = sorted(active & {"gd", "afd"})
    if routed and refused:
        raise ValueError(f"losses {refused} need every teacher on every sample, but teachers {routed} answer only "
                         "their labels: drop those losses or the teachers' labels")
    if routed and {**OPTION_DEFAULTS, **cfg.loss_options}["ensemble_average"] == "logits":
        raise ValueError("loss_options.ensemble_average 'logits' needs every teacher on every sample; "
                         f"teachers {routed} answer only their labels: use 'probs'")
def _check_eval_shards(cfg: TrainConfig) -> None:
    """The evaluation curve's test split: shards that exist, with the class names and zero-shot
    templates a zero-shot evaluation needs in their dataset.json."""
    from teacher_service.shards import load_dataset_info

    info = load_dataset_info(resolve_shards(cfg.data.val_shards))
    if not info.get("class_names") or not info.get("templates"):
        raise ValueError(f"eval_every_steps: the dataset.json of data.val_shards {cfg.data.val_shards} has no "
                         "class_names or templates, which zero-shot evaluation needs (write them with `kd data`)")


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


def _check_losses(cfg: TrainConfig, members: list[TeacherSourceConfig]) -> None:
    unknown = sorted(set(cfg.losses) - set(LOSSES))
    if unknown:
        raise ValueError(f"unknown loss names {unknown} in losses {cfg.losses}; known: {sorted(LOSSES)}")
    average = {**OPTION_DEFAULTS, **cfg.loss_options}.get("ensemble_average")
    if average not in ENSEMBLE_AVERAGES:
        raise ValueError(f"loss_options.ensemble_average {average!r}: expected one of {ENSEMBLE_AVERAGES}")
    mode = members[0].mode
    active = [name for name, weight in cfg.losses.items() if weight]
    centroids_given = cfg.loss_options.get("class_centroids") is not None
    per_batch = losses_needing_teacher(cfg.losses, centroids_given)
    if per_batch and not mode.gives_outputs:
        raise ValueError(f"losses {per_batch} need a teacher, but teacher.mode is '{mode}': choose one of "
                         f"{[m.value for m in TeacherMode if m.gives_outputs]}, or drop them")
    if "embed_kd" in active and not centroids_given and not mode.computes_centroids:
        from teacher_service.cache import CENTROIDS_FILE, teacher_dir

        cache = members[0].cache_path
        if not (mode.reads_cache and os.path.isfile(os.path.join(teacher_dir(cache, members[0].cache_teacher),
                                                                    CENTROIDS_FILE))):
            raise ValueError(centroids_missing(cfg))


def _check_app(teacher: TeacherSourceConfig) -> dict:
    """The teacher app's info; TeacherUnavailableError naming the apps that do run when it is absent."""
    import ray

    from teacher_service.app import get_teacher_handle

    if not ray.is_initialized():
        return {}
    handle = get_teacher_handle(teacher.app_name, timeout_s=teacher.timeout_s)
    return handle.info.remote().result(timeout_s=teacher.timeout_s)


def _check_cache(cfg: TrainConfig, teacher: TeacherSourceConfig, teacher_info: dict | None) -> str | None:
    """The cache exists and holds rows (cache mode), and was made by this teacher with this run's
    views, in the run's `answer_dtype` when it names one; returns its teacher fingerprint (None: a
    hybrid run starting a new cache). A root holding several teachers and a `cache` teacher that
    names none of them fails here (CacheAmbiguousError)."""
    from teacher_service.cache import EmbeddingCache

    recipe = view_recipe(cfg.data.image_size, cfg.seed)
    writes = teacher.mode.writes_cache
    if writes and not os.path.isdir(teacher.cache_path):
        return None  # hybrid starts a new cache
    cache = EmbeddingCache.open(teacher.cache_path, teacher_info=teacher_info or None, recipe=recipe,
                                create=writes, teacher=teacher.cache_teacher, answer_dtype=teacher.answer_dtype)
    if teacher.mode.cache_only and len(cache) == 0:
        raise FileNotFoundError(f"embedding cache {cache.path} holds no rows: run `kd precompute` over "
                                f"{cfg.data.train_shards} first, or train with teacher.mode 'hybrid'")
    return cache.fingerprint


def centroids_missing(cfg: TrainConfig) -> str:
    """Why Embed-KD cannot start, and the three ways to give it centroids."""
    return (f"loss embed_kd needs class centroids: give loss_options.class_centroids, write them into the "
            f"cache (`kd precompute --class-centroids N --out {cfg.teacher.cache_path or 'CACHE'}`), or use a "
            f"running teacher (teacher.mode one of {[m.value for m in TeacherMode if m.computes_centroids]}, not "
            f"'{cfg.teacher.mode}') to compute them")
