"""What the distillation losses share: the base class the registry reads (`name`, `needs_teacher`,
`uses_projection`, how a loss is built from the run's options and how its weight is scaled), the
student→teacher projection head, and the learnable, clamped logit scale of ICL and AFD (CLIP-KD
used the raw parameter, unbounded)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn


INIT_LOGIT_SCALE = 1.0 / 0.07
MAX_LOGIT_SCALE = 100.0


def _learnable_log_scale(init_scale: float) -> nn.Parameter:
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
    return nn.Parameter(torch.tensor(math.log(init_scale)))


def _clamped_scale(log_scale: torch.Tensor, max_scale: float) -> torch.Tensor:
    """exp(log_scale) clamped to max_scale (CLIP-KD used the raw parameter, unbounded)."""
    return log_scale.exp().clamp(max=max_scale)


class FeatureProjection(nn.Module):
    """P: student embeddings to the teacher's width, re-normalised (as CLIP-KD does).

    A Linear per modality when the widths differ, identity otherwise. `build_losses` shares
    one instance between FD, MFD, ICL, GD and AFD, like CLIP-KD's single visual/text projection.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        _check_dims(student_dim, teacher_dim)
        same = student_dim == teacher_dim
        self.image = nn.Identity() if same else nn.Linear(student_dim, teacher_dim)
        self.text = nn.Identity() if same else nn.Linear(student_dim, teacher_dim)

    def forward(self, features: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        layer = self.image if modality == "image" else self.text
        return F.normalize(layer(features), dim=-1)


def _check_dims(student_dim: int, teacher_dim: int) -> None:
    for label, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"{label} must be a positive int, got {dim!r}")


class DistillLoss(nn.Module):
    """Base: `name` keys the registry and the output; `needs_teacher` per-batch teacher outputs."""

    name: str = ""
    needs_teacher: bool = True
    uses_projection: bool = False

    @classmethod
    def from_options(
        cls, student_dim: int, teacher_dim: int, projection: FeatureProjection | None,
        options: Mapping[str, Any],
    ) -> "DistillLoss":
        return cls()

    @classmethod
    def weight_factor(cls, teacher_dim: int, options: Mapping[str, Any]) -> float:
        """What `build_losses` multiplies the given weight by (1: the weight is used as given)."""
        return 1.0


class _ProjectedLoss(DistillLoss):
    """FD, MFD, GD, ICL and AFD: losses on the student's embeddings projected to the teacher's width
    (one `FeatureProjection`, shared by the run's losses when `build_losses` passes it)."""

    uses_projection = True

    def __init__(self, student_dim: int, teacher_dim: int, projection: FeatureProjection | None = None):
        super().__init__()
        self.projection = projection if projection is not None else FeatureProjection(student_dim, teacher_dim)

    @classmethod
    def from_options(cls, student_dim, teacher_dim, projection, options):
        return cls(student_dim, teacher_dim, projection)


class _ScaledProjectionLoss(_ProjectedLoss):
    """ICL and AFD: the shared student→teacher projection plus their own learnable, clamped scale."""

    def __init__(self, student_dim: int, teacher_dim: int, projection: FeatureProjection | None = None,
                 init_scale: float = INIT_LOGIT_SCALE, max_scale: float = MAX_LOGIT_SCALE):
        super().__init__(student_dim, teacher_dim, projection)
        self.log_scale = _learnable_log_scale(init_scale)
        self.max_scale = float(max_scale)

    @classmethod
    def from_options(cls, student_dim, teacher_dim, projection, options):
        return cls(student_dim, teacher_dim, projection, options["init_scale"], options["max_scale"])
