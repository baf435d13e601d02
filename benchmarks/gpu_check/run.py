"""Running sections: each writes `<out>/sections/<name>.json` as soon as it ends, so a later
section that hangs or crashes (`gpu_check.sh` gives each its own timeout) loses nothing before it.

The sections that need Ray (teacher, students) share one workspace per process: the cluster
(embedded, or the one this process is already connected to), a temporary work folder and the
digits shards at the check's image size.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.suite.records import finite_json, machine_info, now_iso
from teacher_service.atomic_files import write_atomic

from benchmarks.gpu_check.config import SECTIONS, GpuCheckConfig


class Workspace:
    """What the Ray sections share in one process; `close()` removes the work folder."""

    def __init__(self, cfg: GpuCheckConfig) -> None:
        self.cfg = cfg
        self._tmp = tempfile.TemporaryDirectory(prefix="kd-gpu-check-")
        self._run = None

    def bench_run(self, section: str):
        """The bench's run state (`benchmarks.suite.common.BenchRun`), Ray connected, shards written."""
        from benchmarks.suite.common import BenchRun, architectures
        from benchmarks.suite.config import BenchConfig, Models
        from benchmarks.suite.cores import plan_cores
        from cluster.local import init_ray
        from student_trainer.data.write_shards import write_digits_shards

        if self._run is None:
            import torch

            cfg = self.cfg
            print(init_ray(None, num_cpus=max(8, os.cpu_count() or 1), verbose=False), flush=True)
            models = Models(teacher=cfg.teacher, teacher_overrides=dict(cfg.teacher_overrides), student=cfg.student,
                            student_overrides=dict(cfg.student_overrides), image_size=cfg.image_size,
                            precision=cfg.teacher_precision)
            bench = BenchConfig(preset="gpu-check-dry-run" if cfg.dry_run else "gpu-check", models=models,
                                use_gpu=torch.cuda.is_available() and not cfg.dry_run, pin_cores=False, seed=cfg.seed)
            work = Path(self._tmp.name)
            write_digits_shards(work / "data", image_size=cfg.image_size, samples_per_shard=200)
            self._run = BenchRun(cfg=bench, plan=plan_cores(False), work=work, data=work / "data",
                                 context={"command": "benchmarks/gpu_check.sh", "started": now_iso(),
                                          "preset": bench.preset, "machine": machine_info()["summary"]})
            self._run.context["architectures"] = architectures(self._run)
        self._run.records = []  # each section writes its own
        self._run.log(f"section {section}")
        return self._run

    def close(self) -> None:
        self._tmp.cleanup()


def _machine(cfg, ws):
    from benchmarks.gpu_check.machine import machine_section

    return machine_section()


def _losses(cfg, ws):
    from benchmarks.gpu_check.losses import run_losses

    return run_losses(cfg)


def _gather(cfg, ws):
    from benchmarks.gpu_check.gather import run_gather

    return run_gather(cfg)


def _teacher(cfg, ws):
    from benchmarks.gpu_check.teacher import run_teacher

    run = ws.bench_run("teacher")
    return {**run_teacher(cfg, run), "records": [r.to_dict() for r in run.records]}


def _students(cfg, ws):
    from benchmarks.gpu_check.students import run_students

    run = ws.bench_run("students")
    return {**run_students(cfg, run), "records": [r.to_dict() for r in run.records]}


RUNNERS = {"machine": _machine, "losses": _losses, "gather": _gather, "teacher": _teacher, "students": _students}
assert tuple(RUNNERS) == SECTIONS


def plain(obj: Any) -> Any:
    """`obj` with every non-finite float written as a string ('inf', 'nan'): JSON keeps it, and it
    cannot pass for a number."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def section_path(out: Path, name: str) -> Path:
    return Path(out) / "sections" / f"{name}.json"


def run_section(name: str, cfg: GpuCheckConfig, ws: Workspace, out: Path) -> dict[str, Any]:
    """Run one section, write its JSON (status ok, skipped or error), return it."""
    if name not in RUNNERS:
        raise ValueError(f"section {name!r}: expected one of {SECTIONS}")
    started, t0 = now_iso(), time.perf_counter()
    print(f"[gpu check] section {name}: start", flush=True)
    try:
        body = RUNNERS[name](cfg, ws)
        status = "skipped" if "skipped" in body else "ok"
    except Exception as e:  # noqa: BLE001 - a failed section is reported; the script runs the next one
        traceback.print_exc()
        body, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}, "error"
    doc = plain({"section": name, "status": status, "dry_run": cfg.dry_run, "started": started,
                 "wall_s": round(time.perf_counter() - t0, 1), "config": cfg.to_dict(), **body})
    write_atomic(section_path(out, name), finite_json(doc))
    print(f"[gpu check] section {name}: {status} in {doc['wall_s']} s"
          + (f" ({body.get('skipped') or body.get('error')})" if status != "ok" else ""), flush=True)
    return doc
