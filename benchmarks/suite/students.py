"""Section 1: one student, its data and batch, by teacher mode (none, inline, remote, hybrid, cache).

Per mode and repeat (modes interleaved, so drift hits every mode alike): samples/s, its ratio to
`none` in the same repeat, the student worker's peak memory (RSS on CPU, max allocated on GPU),
the time it waited for the teacher, and the teacher-seconds the mode cost: the pool's summed
forward time during the run (remote, hybrid), the in-worker teacher time (inline), none at train
time for cache (its one-off precompute cost is its own record). `none` trains with the CLIP loss
only; every other mode adds `distill_losses`, so part of their gap to `none` is those losses'
own compute (the cache row isolates it: no teacher runs there at all). Every run trains on the
same views, so coalescing is off: otherwise the pool would answer later runs from its table of
recent rows and their teacher-seconds would be zero. Each mode also gets its step profile
(`student_trainer.profile`: data, teacher wait, converting the answers, compute, the loop's own
work, in ms per step), so a gap to `none` reads as the part that grew, and the CPU the process's
other threads used per step (the cost of sending and receiving that no wall-time part shows).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from ray import serve

from student_trainer.profile import PARTS
from student_trainer.train import run_training
from teacher_service.app import collect_stats, deploy
from teacher_service.shards import resolve_shards, shard_sample_counts

from benchmarks.suite.common import BenchRun, teacher_config, train_config
from benchmarks.suite.config import MODES

PROFILED = (*PARTS, "compute_cpu", "background_cpu")
CPU_NOTES = {
    "compute_cpu": "the loop thread's CPU time inside compute: the same work taking more CPU means a slower core "
                   "(caches, memory shared with a busy neighbour); compute minus this is time the thread did not run",
    "background_cpu": "CPU of the student process's other threads (Ray's core worker, the Serve handle's router, "
                      "data readers); with the student pinned to one core it is taken from the step",
}
FIRST_WAIT_NOTE = ("of the teacher wait, the first step's: the prefetch window filling at the epoch's start, "
                   "which no prefetch depth hides; a fixed cost per epoch, spread over this run's few steps")
LATER_WAIT_NOTE = ("the wait after the first step, per step: answers not back when a step needed them, "
                   "the pool falling behind the student")
HEADROOM_NOTE = ("the student's own time (the epoch less its teacher wait) over the pool's forward time in the run: "
                 "under 1 the pool is slower than the student and no prefetch depth hides it; near 1 the pool's "
                 "jitter shows as later-step waits")
SECTION = "students"
APP = "kd-bench-teacher"
POOL_MODES = ("remote", "hybrid")
TARGETS = {"remote": ">= 0.95", "hybrid": ">= 0.90", "cache": ">= 0.98"}
MEMORY_TARGET = "<= 1.05"  # remote and cache: within 5 % of none


def pool_forward_s(handle) -> float:
    """The Serve pool's summed forward time so far (all replicas)."""
    return float(collect_stats(handle)["forward_s"])


def run_mode(run: BenchRun, mode: str, rep: int, handle, caches: dict) -> dict:
    """One training run of `mode`; the cold hybrid run gets a fresh, empty cache."""
    sb = run.cfg.students
    if mode == "hybrid":
        caches[rep] = str(run.work / f"hybrid-cache-{rep}")
    cache_path = {"cache": caches.get("precomputed", caches.get(rep)), "hybrid": caches.get(rep)}.get(mode)
    losses = {"clip": 1.0} if mode == "none" else {"clip": 1.0, **sb.distill_losses}
    cfg = train_config(run, f"bench-{mode}-{rep}", mode, app_name=APP, losses=losses, batch_size=sb.batch_size,
                       steps=sb.steps, shards=run.train_shards(sb.train_shards), workers=sb.workers,
                       prefetch=sb.prefetch, cache_path=cache_path, coalesce=False)
    before = pool_forward_s(handle)
    metrics = run_training(cfg).metrics
    pool_s = pool_forward_s(handle) - before
    teacher_s = metrics.get("teacher_wait_s", 0.0) if mode == "inline" else (pool_s if mode in ("remote", "hybrid")
                                                                              else 0.0)
    memory = metrics.get("peak_gpu_mem_mb") if run.cfg.use_gpu else metrics["peak_rss_mb"]
    return {"samples_per_s": metrics["train_samples_per_s"], "memory_mb": memory,
            "teacher_wait_s": metrics.get("teacher_wait_s", 0.0), "teacher_s": teacher_s,
            "epoch_time_s": metrics.get("epoch_time_s"), "wait_first_ms": metrics.get("teacher_wait_first_step_ms"),
            "profile": {part: metrics.get(f"step_{part}_ms") for part in PROFILED}}


def precompute_cache(run: BenchRun, out: Path) -> dict:
    """`kd precompute`'s job over the section's shards, one view, the teacher on its cores."""
    from teacher_service.cache.precompute import precompute

    sb = run.cfg.students
    shards = resolve_shards(run.train_shards(sb.train_shards))
    tcfg = teacher_config(run, APP, max_batch_size=sb.batch_size, request_samples=sb.batch_size)
    summary = precompute(shards, str(out), views=1, teacher=tcfg, image_size=run.cfg.models.image_size,
                         seed=run.cfg.seed, num_cpus=1.0, num_gpus=tcfg.serving.num_gpus, concurrency=1,
                         batch_size=sb.batch_size, progress=False)
    return {"rows": summary.rows, "wall_s": summary.wall_s, "teacher_s": summary.teacher_s}


def run_students(run: BenchRun) -> None:
    sb = run.cfg.students
    modes = [m for m in MODES if m in sb.modes]  # hybrid before cache: cache may read what hybrid filled
    tcfg = teacher_config(run, APP, max_batch_size=sb.pool_max_batch_size, request_samples=sb.batch_size)
    run.log(f"students: deploying teacher {run.cfg.models.teacher} (app {APP})")
    handle = deploy(tcfg, access_log=run.cfg.verbose)
    handle.info.remote().result(timeout_s=600)
    caches: dict = {}
    if "cache" in modes and sb.precompute:
        run.log("students: precomputing the cache for mode cache")
        caches["precomputed"] = str(run.work / "precomputed")
        pre = precompute_cache(run, Path(caches["precomputed"]))
        _record_precompute(run, pre)
    results: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for rep in range(run.cfg.repeats):
            for mode in modes:
                run.log(f"students: mode {mode}, repeat {rep + 1}/{run.cfg.repeats}")
                results[mode].append(run_mode(run, mode, rep, handle, caches))
    finally:
        serve.delete(APP)  # its replica's cores/GPU go to the next sections
    run.shared["student_results"] = results
    run.shared["student_cache"] = caches.get("precomputed", caches.get(0))
    _record_modes(run, results)


def _record_precompute(run: BenchRun, pre: dict) -> None:
    params = {"rows": pre["rows"], "views": 1, "teacher": run.cfg.models.teacher}
    run.add(SECTION, "precompute teacher-seconds (one-off, for every later run and epoch)", "s",
            [pre["teacher_s"]], params=params)
    run.add(SECTION, "precompute teacher rows/s", "rows/s", [pre["rows"] / max(pre["teacher_s"], 1e-9)],
            params=params)
    run.shared["precompute_rows_per_s"] = pre["rows"] / max(pre["teacher_s"], 1e-9)


def _record_modes(run: BenchRun, results: dict[str, list[dict]]) -> None:
    sb = run.cfg.students
    base = results.get("none")
    for mode, runs in results.items():
        params = {"mode": mode, "batch_size": sb.batch_size, "steps": sb.steps, "workers": sb.workers,
                  "prefetch": sb.prefetch, "losses": "clip" if mode == "none" else f"clip + {sb.distill_losses}"}
        if mode in POOL_MODES:
            params["pool_max_batch_size"] = sb.pool_max_batch_size
        run.add(SECTION, f"samples/s ({mode})", "samples/s", [r["samples_per_s"] for r in runs], params=params)
        mem_unit = "MB GPU max allocated" if run.cfg.use_gpu else "MB peak RSS"
        memory = [r["memory_mb"] for r in runs if r["memory_mb"] is not None]
        if memory:
            run.add(SECTION, f"student worker memory ({mode})", mem_unit, memory, params=params)
        run.add(SECTION, f"teacher-seconds ({mode})", "s", [r["teacher_s"] for r in runs], params=params,
                note={"inline": "in the student worker", "remote": "pool forward time",
                      "hybrid": "pool forward time (cold: every sample a miss)",
                      "cache": "none at train time", "none": "no teacher"}[mode])
        run.add(SECTION, f"teacher wait ({mode})", "s", [r["teacher_wait_s"] for r in runs], params=params)
        first = [r["wait_first_ms"] for r in runs if r.get("wait_first_ms") is not None]
        if first and mode != "none":
            run.add(SECTION, f"teacher wait, first step ({mode})", "ms", first, params=params, note=FIRST_WAIT_NOTE)
        if mode in POOL_MODES:
            _record_pool_pace(run, mode, runs, params)
        for part in PROFILED:  # where a step's time goes (student_trainer.profile), rank 0's last epoch
            values = [r["profile"][part] for r in runs if r.get("profile", {}).get(part) is not None]
            if values:
                run.add(SECTION, f"step {part} ({mode})", "ms/step" if part in PARTS else "CPU ms/step", values,
                        params=params, note=CPU_NOTES.get(part, ""))
        if base and mode != "none":
            ratios = [r["samples_per_s"] / b["samples_per_s"] for r, b in zip(runs, base)]
            run.add(SECTION, f"samples/s ratio to none ({mode})", "x", ratios, params=params, kind="derived",
                    target=TARGETS.get(mode), note="per repeat: this mode over none in the same repeat")
            if memory and mode in ("remote", "cache", "hybrid", "inline"):
                mem = [r["memory_mb"] / b["memory_mb"] for r, b in zip(runs, base)]
                run.add(SECTION, f"memory ratio to none ({mode})", "x", mem, params=params, kind="derived",
                        target=MEMORY_TARGET if mode in ("remote", "cache") else None)
    if base:
        run.shared["none_samples_per_s"] = statistics.median(r["samples_per_s"] for r in base)


def _record_pool_pace(run: BenchRun, mode: str, runs: list[dict], params: dict) -> None:
    """Whether the pool kept pace: the wait after the first step, and the pool's headroom."""
    steps = run.cfg.students.steps
    later = [max(0.0, 1000.0 * r["teacher_wait_s"] - r["wait_first_ms"]) / (steps - 1) for r in runs
             if r.get("wait_first_ms") is not None and steps > 1]
    if later:
        run.add(SECTION, f"teacher wait, later steps ({mode})", "ms/step", later, params=params, note=LATER_WAIT_NOTE)
    headroom = [(r["epoch_time_s"] - r["teacher_wait_s"]) / r["teacher_s"] for r in runs
                if r["teacher_s"] and r.get("epoch_time_s") is not None]
    if headroom:
        run.add(SECTION, f"pool headroom ({mode})", "x", headroom, params=params, kind="derived", note=HEADROOM_NOTE)
