"""What the GPU check runs, as data: the real sizes for one GPU, and the dry run's tiny ones.

The real sizes are `kd bench --preset gpu`'s architectures (a ViT-L-14 teacher, a ViT-B-16
student, 224 px), cut to what one GPU runs in a few minutes: the teacher pool and one student
share the card by fractional `num_gpus` (`gpu_share` each). The dry run keeps every section and
loop, with the same architecture families thinned to two layers at 32 px (the bench's smoke
form), on CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SECTIONS = ("machine", "losses", "gather", "teacher", "students")


@dataclass
class GpuCheckConfig:
    """One GPU check. Teacher section: the direct and the served forward at each of `batch_sizes`
    in each of `precisions`, `requests` timed requests per point and repeat, `in_flight` kept
    outstanding. Students section: one student per mode for `student_epochs` epochs of
    `student_steps` steps (its figures are the last epoch's: the first warms up cuDNN, the
    allocator and the pool), the pool in `teacher_precision`. Losses section: every registry loss
    on a batch of `loss_batch`, compared with CPU fp32 within `fp32_tol`, `autocast_tol[dtype]`
    under autocast (relative to the largest magnitude of the CPU result)."""

    dry_run: bool = False
    teacher: str = "ViT-L-14"
    teacher_overrides: dict = field(default_factory=dict)
    student: str = "ViT-B-16"
    student_overrides: dict = field(default_factory=dict)
    image_size: int = 224
    precisions: list = field(default_factory=lambda: ["fp16", "bf16"])
    batch_sizes: list = field(default_factory=lambda: [64, 256])
    requests: int = 12
    in_flight: int = 2
    repeats: int = 3
    modes: list = field(default_factory=lambda: ["none", "remote", "cache"])
    student_batch: int = 128
    student_steps: int = 10
    student_epochs: int = 2
    train_shards: int | None = None  # the first N digits train shards of 200 samples (None: all 8)
    teacher_precision: str = "fp16"
    gpu_share: float = 0.5
    distill_losses: dict = field(default_factory=lambda: {"kl": 1.0, "fd": 2000.0})
    loss_batch: int = 32
    loss_dims: tuple = (64, 96)  # (student, teacher) embedding widths: D_s != D_t, so projections run
    loss_classes: int = 5
    fp32_tol: float = 1e-4
    # autocast: a few tens of the dtype's epsilon (fp16 9.8e-4, bf16 7.8e-3); CPU bf16 measured <= 0.035
    autocast_tol: dict = field(default_factory=lambda: {"float16": 2e-2, "bfloat16": 1e-1})
    served_ratio_target: float = 0.90  # served / direct, fp16, at the largest batch size
    remote_ratio_target: float = 0.97  # remote / none samples/s
    seed: int = 0

    def validate(self) -> GpuCheckConfig:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes: expected sizes >= 1, got {self.batch_sizes}")
        bad = sorted(set(self.precisions + [self.teacher_precision]) - {"fp32", "fp16", "bf16"})
        if bad:
            raise ValueError(f"precisions {bad}: expected fp32, fp16 or bf16")
        if not set(self.modes) <= {"none", "remote", "cache"} or "none" not in self.modes:
            raise ValueError(f"modes {self.modes}: expected none (the base of every ratio) and any of remote, cache")
        if not 0 < self.gpu_share <= 0.5:
            raise ValueError(f"gpu_share must be in (0, 0.5] (a teacher and a student on one GPU), got {self.gpu_share}")
        for name in ("requests", "in_flight", "repeats", "student_batch", "student_steps", "student_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def gpu_config() -> GpuCheckConfig:
    """The real sizes, on one GPU."""
    return GpuCheckConfig().validate()


def dry_run_config() -> GpuCheckConfig:
    """Every section and loop of the real run, tiny, on CPU: the bench's smoke form of the gpu
    preset's architectures (two layers at 32 px), a few requests and steps."""
    from benchmarks.suite.config import preset, smoke_form

    thin = smoke_form(preset("gpu")).models
    return GpuCheckConfig(
        dry_run=True, teacher=thin.teacher, teacher_overrides=thin.teacher_overrides, student=thin.student,
        student_overrides=thin.student_overrides, image_size=thin.image_size, batch_sizes=[4, 8], requests=3,
        repeats=1, student_batch=16, student_steps=3, student_epochs=1, train_shards=1, loss_batch=8, loss_dims=(8, 12),
        loss_classes=3).validate()
