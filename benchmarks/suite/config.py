"""What a benchmark run measures, as data: one dataclass per section plus the presets.

`smoke` is sized to finish in about a minute on a busy 2-core box (it proves every section still
runs; its figures mean nothing), `cpu` measures open_clip architectures at their real widths on
CPU cores (images and context shortened so a 2-core machine finishes in about half an hour), and
`gpu` the real sizes (ViT-L-14 teacher, ViT-B-16 student, 224 px) on a machine with >= 2 GPUs.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from student_trainer.teacher.modes import TeacherMode

SECTIONS = ("students", "pool", "multi", "cache", "scale")
# Every teacher mode, those that only read a cache last: without precompute, `cache` reads what the
# cold `hybrid` run filled (StudentBench.precompute). Plain strings: they go into the records.
MODES = tuple(m.value for m in sorted(TeacherMode, key=lambda m: m.cache_only))


@dataclass
class Models:
    """The architectures measured: open_clip names (random init) or the digits presets, with
    `create_model` overrides; `image_size` is the side of the views students train on and send."""

    teacher: str = "digits-teacher"
    teacher_overrides: dict = field(default_factory=dict)
    student: str = "digits-student"
    student_overrides: dict = field(default_factory=dict)
    image_size: int = 32
    precision: str = "fp32"


@dataclass
class StudentBench:
    """Section 1: one student, data and batch, by teacher mode. `precompute`: build the `cache`
    mode's cache with `kd precompute`'s job (its one-off teacher cost is recorded); False: `cache`
    reads what the cold `hybrid` run appended (no Ray Data job: the smoke preset).

    `pool_batch_requests`: the pool's max_batch_size, in student batches. A GPU forward of a few
    batches costs little more than one, so merging the requests queued in the student's window
    pays; a CPU forward costs about as much per sample at any batch, and a merged forward answers
    all its requests at its end, so the student's second batch waits for its third: the cpu
    preset serves one batch per forward."""

    modes: list = field(default_factory=lambda: list(MODES))
    batch_size: int = 16
    steps: int = 20
    workers: int = 1
    prefetch: int = 2
    distill_losses: dict = field(default_factory=lambda: {"kl": 1.0, "fd": 2000.0})
    precompute: bool = True
    train_shards: int | None = 2  # use only the first N digits train shards (200 samples each)
    pool_batch_requests: int = 4

    @property
    def pool_max_batch_size(self) -> int:
        return self.pool_batch_requests * self.batch_size


@dataclass
class PoolBench:
    """Section 2: served embeddings/s by batch size and replica count; the direct forward at the
    same batch sizes; `requests` per point and repeat, `in_flight_per_replica` kept outstanding."""

    batch_sizes: list = field(default_factory=lambda: [8, 32, 64])
    replicas: list = field(default_factory=lambda: [1, 2])
    requests: int = 20
    in_flight_per_replica: int = 2


@dataclass
class MultiBench:
    """Section 3: N runs on one pool. `students="train"`: each run is a real `kd train` process
    (as `kd sweep` starts them); `"clients"`: each run is a request stream with the student's
    batches and no student compute (it measures how the pool shares itself, nothing about students)."""

    runs: list = field(default_factory=lambda: [1, 2, 4])
    layouts: list = field(default_factory=lambda: ["shared", "distinct"])
    students: str = "train"
    batch_size: int = 16
    steps: int = 20
    epochs: int = 2
    client_seconds: float = 5.0
    poll_s: float = 0.5


@dataclass
class CacheBench:
    """Section 4: reads of the section-1 cache and of synthetic caches at real teacher widths."""

    synthetic_dims: list = field(default_factory=lambda: [512, 768])
    synthetic_rows: int = 20000
    batch_size: int = 64
    batches: int = 200


@dataclass
class ScaleModelConfig:
    """Section 5's inputs that are not measured here: architectures (their FLOPs are open_clip's
    published profile), the GPU's peak and the fraction of it reached (assumed), and link speeds."""

    teacher: str = "ViT-L-14"
    students: list = field(default_factory=lambda: ["ViT-B-16", "ViT-B-32"])
    gpu_name: str = "H100 SXM (bf16 dense)"
    gpu_peak_tflops: float = 989.0
    mfu: float = 0.4
    gpus_per_node: int = 8
    link_gbps: list = field(default_factory=lambda: [10.0, 25.0, 100.0, 400.0])
    image_size: int = 224
    context_length: int = 77
    embed_dim: int = 768
    runs_sharing: list = field(default_factory=lambda: [1, 2, 4])


@dataclass
class BenchConfig:
    """One `kd bench` run. `teacher_cores`/`student_cores`: cores pinned to each side on this
    machine (None: half each); `pin_cores=False` when teacher and students are on separate nodes."""

    preset: str = "smoke"
    models: Models = field(default_factory=Models)
    students: StudentBench = field(default_factory=StudentBench)
    pool: PoolBench = field(default_factory=PoolBench)
    multi: MultiBench = field(default_factory=MultiBench)
    cache: CacheBench = field(default_factory=CacheBench)
    scale: ScaleModelConfig = field(default_factory=ScaleModelConfig)
    sections: list = field(default_factory=lambda: list(SECTIONS))
    repeats: int = 3
    out: str = "benchmarks/results"
    pin_cores: bool = True
    teacher_cores: int | None = None
    student_cores: int | None = None
    use_gpu: bool = False
    address: str | None = None
    workdir: str | None = None  # data, caches and runs; None: a temporary directory (one machine only)
    seed: int = 0
    verbose: bool = False  # Serve access logs and Ray INFO lines on the console (kd bench --verbose)

    def validate(self) -> BenchConfig:
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"sections {unknown}: expected some of {SECTIONS}")
        bad_modes = sorted(set(self.students.modes) - set(MODES))
        if bad_modes:
            raise ValueError(f"modes {bad_modes}: expected some of {MODES}")
        if "cache" in self.students.modes and not self.students.precompute and "hybrid" not in self.students.modes:
            raise ValueError("mode cache without precompute reads the cache the hybrid run filled: add hybrid")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.students.pool_batch_requests < 1:
            raise ValueError(f"students.pool_batch_requests must be >= 1, got {self.students.pool_batch_requests}")
        if self.multi.students not in ("train", "clients"):
            raise ValueError(f"multi.students: expected 'train' or 'clients', got {self.multi.students!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _smoke() -> BenchConfig:
    return BenchConfig(
        preset="smoke", repeats=1,
        students=StudentBench(modes=["none", "remote", "hybrid", "cache"], batch_size=16, steps=3, precompute=False,
                              train_shards=1),
        pool=PoolBench(batch_sizes=[16], replicas=[1], requests=6),
        multi=MultiBench(runs=[1, 2], layouts=["shared"], students="clients", batch_size=8,
                         client_seconds=1.5, poll_s=0.2),
        cache=CacheBench(synthetic_dims=[128], synthetic_rows=2000, batches=20))


_REAL_WIDTH_CPU = {"force_image_size": 64, "force_context_length": 16}


def _cpu() -> BenchConfig:
    return BenchConfig(
        preset="cpu", repeats=3,
        models=Models(teacher="ViT-B-16", teacher_overrides=dict(_REAL_WIDTH_CPU),
                      student="ViT-S-16", student_overrides=dict(_REAL_WIDTH_CPU), image_size=64),
        students=StudentBench(batch_size=16, steps=15, train_shards=2, pool_batch_requests=1),
        pool=PoolBench(batch_sizes=[4, 16, 64], replicas=[1, 2], requests=8),
        multi=MultiBench(runs=[1, 2, 4], layouts=["shared", "distinct"], students="train", batch_size=16,
                         steps=10, epochs=1),
        cache=CacheBench(synthetic_dims=[512, 768], synthetic_rows=20000))


def _gpu() -> BenchConfig:
    return BenchConfig(
        preset="gpu", repeats=3, use_gpu=True,
        models=Models(teacher="ViT-L-14", student="ViT-B-16", image_size=224, precision="fp16"),
        students=StudentBench(batch_size=128, steps=50, train_shards=None),
        pool=PoolBench(batch_sizes=[32, 128, 256, 512], replicas=[1], requests=40),
        multi=MultiBench(runs=[1, 2, 4], layouts=["shared", "distinct"], students="train", batch_size=128,
                         steps=40, epochs=1),
        cache=CacheBench(synthetic_dims=[512, 768, 1024], synthetic_rows=100000))


PRESETS = {"smoke": _smoke, "cpu": _cpu, "gpu": _gpu}

# Each architecture cut to two thin layers at 32 px: the family's code path, a smoke test's cost.
_THIN = {"embed_dim": 64,
         "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def smoke_form(cfg: BenchConfig, *, gpu: bool = False) -> BenchConfig:
    """A preset's structure at smoke sizes: the same sections, student modes (and whether `cache`
    is precomputed), multi-run layouts and architecture families, each model thinned to two layers
    at 32 px, every count and duration the `smoke` preset's. GPU and the preset's precision only
    where `gpu` (CUDA present): on CPU, fp32. It proves the preset's whole path runs (`kd bench
    --preset gpu --smoke-form` on a CPU box) before GPU time is spent on it; its figures mean nothing."""
    small = _smoke()
    out = copy.deepcopy(cfg)
    out.preset, out.repeats, out.use_gpu = f"{cfg.preset}-smoke-form", 1, gpu and cfg.use_gpu
    out.models = dataclasses.replace(cfg.models, teacher_overrides=copy.deepcopy(_THIN),
                                     student_overrides=copy.deepcopy(_THIN), image_size=32,
                                     precision=cfg.models.precision if out.use_gpu else "fp32")
    out.students = dataclasses.replace(cfg.students, batch_size=small.students.batch_size,
                                       steps=small.students.steps, train_shards=small.students.train_shards)
    out.pool = dataclasses.replace(small.pool, replicas=cfg.pool.replicas[:1])
    out.multi = dataclasses.replace(small.multi, layouts=list(cfg.multi.layouts), students=cfg.multi.students,
                                    steps=3)
    out.cache = dataclasses.replace(small.cache, synthetic_dims=list(cfg.cache.synthetic_dims))
    return out


def preset(name: str) -> BenchConfig:
    """A fresh (deep-copied) config for a preset name."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())
