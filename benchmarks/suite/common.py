"""What every section shares: the run's state (config, core plan, data, records) and the
teacher/student configurations built from it, so every section measures the same models."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from student_trainer.config import (
    DataConfig,
    ModelConfig,
    TeacherSourceConfig,
    TrainConfig,
)
from student_trainer.factory import resolve_model
from teacher_service.config import ServingConfig, TeacherConfig

from benchmarks.suite.config import BenchConfig
from benchmarks.suite.cores import CorePlan
from benchmarks.suite.records import Record


@dataclass
class BenchRun:
    """State of one `kd bench` run. `shared` carries values between sections (e.g. the cache
    section 1 built, the direct forward rate section 2 measured)."""

    cfg: BenchConfig
    plan: CorePlan
    work: Path
    data: Path
    context: dict
    records: list = field(default_factory=list)
    shared: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, section: str, name: str, unit: str, values: list[float], **kwargs) -> Record:
        record = Record(section=section, name=name, unit=unit, values=list(values),
                        context=self.context, **kwargs)
        self.records.append(record)
        return record

    def log(self, message: str) -> None:
        """Progress for long runs: elapsed time, then the message."""
        print(f"[kd bench {time.perf_counter() - self.started:7.1f}s] {message}", flush=True)

    def train_shards(self, limit: int | None) -> str:
        """The shard spec of the first `limit` digits train shards (all of them for None)."""
        shards = sorted(self.data.glob("train-*.tar"))
        n = len(shards) if limit is None else min(limit, len(shards))
        return str(self.data / f"train-{{000000..{n - 1:06d}}}.tar")


def teacher_config(run: BenchRun, app_name: str, *, max_batch_size: int, request_samples: int,
                   replicas: int = 1, inline: bool = False) -> TeacherConfig:
    """The measured teacher: pinned to the teacher's cores as a replica, on the student's cores
    and threads when `inline` (the teacher inside the student worker, OpenCLIP-style)."""
    m, plan = run.cfg.models, run.plan
    arch, overrides = resolve_model(ModelConfig(name=m.teacher, overrides=m.teacher_overrides))
    threads = plan.student_threads if inline else max(1, plan.teacher_threads // replicas)
    needed = math.ceil(max_batch_size / min(request_samples, max_batch_size))
    serving = ServingConfig(app_name=app_name, num_replicas=replicas, num_cpus=1.0,
                            num_gpus=1.0 if run.cfg.use_gpu and not inline else 0.0, max_batch_size=max_batch_size,
                            expected_request_samples=request_samples, max_ongoing_requests=max(32, 2 * needed))
    return TeacherConfig(model=arch, overrides=overrides, precision=m.precision, torch_threads=threads,
                         cpu_affinity=[] if inline else list(plan.teacher), seed=run.cfg.seed, serving=serving)


def train_config(run: BenchRun, name: str, mode: str, *, app_name: str, losses: dict, batch_size: int,
                 steps: int, shards: str, epochs: int = 1, workers: int = 1, prefetch: int = 2,
                 cache_path: str | None = None, seed: int | None = None, coalesce: bool = True) -> TrainConfig:
    """A student run of the measured student on the student's cores. `coalesce=False`: the pool
    computes every request of this run even when another run asked for the same views before."""
    m, plan = run.cfg.models, run.plan
    inline = teacher_config(run, app_name, max_batch_size=batch_size, request_samples=batch_size, inline=True) \
        if mode == "inline" else None
    return TrainConfig(
        run_name=f"{name}-{int(time.time() * 1000) % 10**9}", storage_path=str(run.work / "runs"),
        model=ModelConfig(name=m.student, overrides=dict(m.student_overrides)),
        data=DataConfig(train_shards=shards, batch_size=batch_size, image_size=m.image_size),
        teacher=TeacherSourceConfig(mode=mode, app_name=app_name, teacher=inline, cache_path=cache_path,
                                    prefetch=prefetch, timeout_s=600, coalesce=coalesce),
        losses=losses, epochs=epochs, max_steps_per_epoch=steps, num_workers=workers,
        use_gpu=run.cfg.use_gpu, log_every_steps=0, torch_threads=max(1, plan.student_threads // workers),
        cpu_affinity=list(plan.student), seed=run.cfg.seed if seed is None else seed)


def architectures(run: BenchRun) -> dict:
    """What was measured, as the records and the Markdown name it."""
    m = run.cfg.models
    return {"teacher": m.teacher, "teacher_overrides": m.teacher_overrides, "student": m.student,
            "student_overrides": m.student_overrides, "image_size": m.image_size, "precision": m.precision,
            "weights": "random init (throughput and memory do not depend on the weights)"}
