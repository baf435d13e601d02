"""One student with AMP beside the teacher pool on one GPU, by teacher mode (none, remote, cache).

The pool and the student's Ray Train worker each reserve `gpu_share` of the card
(`ServingConfig.num_gpus`, `TrainConfig.gpus_per_worker`). The cache mode reads a cache the
project's precompute job (`teacher_service.cache.precompute`) filled through the running pool.
Per mode: samples/s of the last epoch and its ratio to `none`, the step profile
(`student_trainer.profile`: data, teacher wait, convert, compute, other, ms per step), the
teacher wait, the GPU memory of each process (the student's and the replica's own
`torch.cuda.max_memory_allocated`, and nvidia-smi's per-process figure where it lists them) and
the pool's forward seconds during the run.

On one shared card the pool's forwards take GPU time from the student, which separate GPUs would
not: `remote / none` here is a floor. The estimate beside it takes the pool's forward time of an
epoch out of the remote epoch (what the student would do with the teacher on its own card); the
teacher wait says whether the answers were late.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.suite.common import BenchRun, teacher_config, train_config
from benchmarks.suite.students import PROFILED, pool_forward_s

from benchmarks.gpu_check.machine import GpuMemorySampler

APP = "kd-gpu-check-teacher"


def fill_cache(cfg, run: BenchRun) -> str:
    """`kd precompute`'s job over the train shards, one view, through the running pool."""
    from teacher_service.cache.precompute import precompute
    from teacher_service.shards import resolve_shards

    out = run.work / "cache"
    summary = precompute(resolve_shards(run.train_shards(cfg.train_shards)), str(out), views=1, app_name=APP,
                         image_size=cfg.image_size, seed=cfg.seed, batch_size=cfg.student_batch, progress=False)
    run.log(f"students: cache of {summary.rows} rows in {summary.wall_s:.1f} s")
    return str(out)


def train_mode(cfg, run: BenchRun, mode: str, handle, cache: str | None) -> dict[str, Any]:
    """One student run in `mode`; its last epoch's figures, the run's memory and pool time."""
    from student_trainer.train import run_training

    losses = {"clip": 1.0} if mode == "none" else {"clip": 1.0, **cfg.distill_losses}
    tc = train_config(run, f"gpu-check-{mode}", mode, app_name=APP, losses=losses, batch_size=cfg.student_batch,
                      steps=cfg.student_steps, shards=run.train_shards(cfg.train_shards), epochs=cfg.student_epochs,
                      workers=1, cache_path=cache if mode == "cache" else None, coalesce=False)
    tc = dataclasses.replace(tc, gpus_per_worker=cfg.gpu_share,
                             data=dataclasses.replace(tc.data, num_views=1))  # the cache holds view 0
    before = pool_forward_s(handle)
    with GpuMemorySampler() as smi:
        metrics = run_training(tc).metrics
    return {"samples_per_s": metrics["train_samples_per_s"], "epoch_time_s": metrics["epoch_time_s"],
            "teacher_wait_s": metrics.get("teacher_wait_s", 0.0),
            "wait_first_step_ms": metrics.get("teacher_wait_first_step_ms"),
            "pool_forward_s": pool_forward_s(handle) - before, "student_gpu_peak_mb": metrics.get("peak_gpu_mem_mb"),
            "student_peak_rss_mb": metrics.get("peak_rss_mb"), "nvidia_smi": smi.peaks(),
            "profile_ms": {part: metrics.get(f"step_{part}_ms") for part in PROFILED}}


def separate_gpu_estimate(cfg, remote: dict) -> float | None:
    """Remote samples/s with one epoch's share of the pool's forward time taken out of the last
    epoch: on one card the two take turns, on separate cards the student would not wait for them."""
    own = remote["epoch_time_s"] - remote["pool_forward_s"] / cfg.student_epochs
    if own <= 0:
        return None
    return remote["samples_per_s"] * remote["epoch_time_s"] / own


def run_students(cfg, run: BenchRun) -> dict[str, Any]:
    """The students section: deploy the pool on its share, fill the cache, train each mode."""
    from ray import serve

    from teacher_service.app import collect_stats, deploy

    share = cfg.gpu_share if run.cfg.use_gpu else 0.0
    tcfg = teacher_config(run, APP, max_batch_size=2 * cfg.student_batch, request_samples=cfg.student_batch)
    tcfg = dataclasses.replace(tcfg, serving=dataclasses.replace(tcfg.serving, num_gpus=share))
    run.log(f"students: deploying the pool ({cfg.teacher}, {cfg.teacher_precision}, {share} GPU)")
    handle = deploy(tcfg, access_log=False)
    handle.info.remote().result(timeout_s=600)
    try:
        cache = fill_cache(cfg, run) if "cache" in cfg.modes else None
        results = {}
        for mode in cfg.modes:
            run.log(f"students: mode {mode}")
            results[mode] = train_mode(cfg, run, mode, handle, cache)
        teacher_peak = collect_stats(handle).get("gpu_peak_bytes")
    finally:
        serve.delete(APP)
    return summarise(cfg, run, results, None if teacher_peak is None else teacher_peak / 2**20)


def summarise(cfg, run: BenchRun, results: dict, teacher_peak_mb: float | None) -> dict[str, Any]:
    """Records, the ratios to `none` and their checks."""
    base = results["none"]["samples_per_s"]
    for mode, r in results.items():
        params = {"mode": mode, "batch_size": cfg.student_batch, "steps": cfg.student_steps, "amp": run.cfg.use_gpu,
                  "gpu_share": cfg.gpu_share if run.cfg.use_gpu else 0.0}
        run.add("students", f"samples/s ({mode})", "samples/s", [r["samples_per_s"]], params=params)
        r["ratio_to_none"] = r["samples_per_s"] / base
    checks = []
    if "remote" in results:
        remote = results["remote"]
        remote["separate_gpu_estimate_ratio"] = (None if separate_gpu_estimate(cfg, remote) is None
                                                 else separate_gpu_estimate(cfg, remote) / base)
        checks.append({"name": "remote / none, one shared GPU (a floor: the pool's forwards use the student's card)",
                       "value": remote["ratio_to_none"], "target": f">= {cfg.remote_ratio_target} on separate GPUs",
                       "passed": remote["ratio_to_none"] >= cfg.remote_ratio_target, "enforced": False})
        estimate = remote["separate_gpu_estimate_ratio"]
        checks.append({"name": "remote / none, the pool's forward time taken out (estimate for separate GPUs)",
                       "value": estimate, "target": f">= {cfg.remote_ratio_target}", "enforced": not cfg.dry_run,
                       "passed": estimate is not None and estimate >= cfg.remote_ratio_target})
    return {"modes": results, "teacher_gpu_peak_mb": teacher_peak_mb, "checks": checks}
