"""Running the sections in order and writing the report: `run_suite(cfg)` is what `kd bench` calls.

Sections run in a fixed order because later ones read what earlier ones measured (the cache
section reads section 1's cache and section 2's teacher rate; the scale model reads the Serve
ratio, the wire bytes and both sides' FLOP rates). A section that fails is reported as failed in
the JSON and Markdown, the others still run, and `run_suite` says so in its result.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.suite.cache import run_cache
from benchmarks.suite.common import BenchRun, architectures
from benchmarks.suite.config import SECTIONS, BenchConfig
from benchmarks.suite.cores import keep_ray_on_teacher_cores, plan_cores
from benchmarks.suite.multi import run_multi
from benchmarks.suite.pool import run_pool
from benchmarks.suite.records import load_average, machine_info, now_iso
from benchmarks.suite.report import write_outputs
from benchmarks.suite.scale import run_scale
from benchmarks.suite.students import run_students

RUNNERS = {"students": run_students, "pool": run_pool, "multi": run_multi, "cache": run_cache, "scale": run_scale}
APPS = ("kd-bench-teacher", "kd-bench-pool", "kd-bench-multi")


def _ray_cpus(cfg: BenchConfig) -> int:
    """Logical CPUs for an embedded cluster: replicas, Train controllers and workers, kd train drivers."""
    return max(8, 2 * max(cfg.multi.runs) + max(cfg.pool.replicas) + 4)


def _workdir(cfg: BenchConfig):
    if cfg.workdir:
        Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
        return contextlib.nullcontext(cfg.workdir)
    return tempfile.TemporaryDirectory(prefix="kd-bench-")


def run_suite(cfg: BenchConfig, command: str) -> dict:
    """Run the selected sections; write bench.json/.md and plots under `cfg.out`.

    Returns {"paths": files written, "errors": {section: message}}.
    """
    from student_trainer.data.write_shards import write_digits_shards

    from cluster.local import init_ray

    cfg.validate()
    plan = plan_cores(cfg.pin_cores, cfg.teacher_cores, cfg.student_cores)
    machine = machine_info({"teacher": plan.teacher_threads, "student": plan.student_threads})  # before pinning
    keep_ray_on_teacher_cores(plan, cfg.address)
    print(init_ray(cfg.address, num_cpus=_ray_cpus(cfg), verbose=cfg.verbose), flush=True)
    started, t0 = now_iso(), time.perf_counter()
    with _workdir(cfg) as tmp:
        work = Path(tmp)
        data = work / "data"
        write_digits_shards(data, image_size=cfg.models.image_size, samples_per_shard=200)
        context = {"machine": machine["summary"], "command": command, "started": started,
                   "preset": cfg.preset}
        run = BenchRun(cfg=cfg, plan=plan, work=work, data=data, context=context)
        context["architectures"] = architectures(run)
        run.log(f"preset {cfg.preset}; {plan.note}; machine: {machine['summary']}")
        statuses = {s: _run_section(run, s) if s in cfg.sections else {"skipped": "not selected (--sections)"}
                    for s in SECTIONS}
        _delete_apps()
    machine["load_average"].append(load_average())
    doc = {"suite": "kd bench", "preset": cfg.preset, "command": command, "started": started,
           "finished": now_iso(), "wall_s": time.perf_counter() - t0, "repeats": cfg.repeats,
           "machine": machine, "architectures": context["architectures"], "core_plan": plan.__dict__,
           "config": cfg.to_dict(), "sections": statuses}
    paths = write_outputs(doc, run.records, Path(cfg.out))
    run.log(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"paths": paths, "errors": {s: st["error"] for s, st in statuses.items() if "error" in st}}


def _run_section(run: BenchRun, section: str) -> dict:
    start, before = time.perf_counter(), len(run.records)
    run.log(f"section {section}: start")
    try:
        RUNNERS[section](run)
    except Exception as e:  # noqa: BLE001 - a failed section is reported; the others still run
        traceback.print_exc()
        run.log(f"section {section}: FAILED: {e}")
        return {"error": f"{type(e).__name__}: {e}", "wall_s": time.perf_counter() - start}
    status = {"records": len(run.records) - before, "wall_s": round(time.perf_counter() - start, 1)}
    run.log(f"section {section}: {status['records']} records in {status['wall_s']} s")
    return status


def _delete_apps() -> None:
    """The suite's own Serve apps (never another app on a shared cluster)."""
    from ray import serve

    for app in APPS:
        with contextlib.suppress(Exception):
            serve.delete(app)
