"""Feature distillation: FD (the projected student embeddings regressed on the teacher's), MFD (FD
on a masked forward of the student: CLIP-KD's overwrote its masked forward, so masking had no
effect) and AFD (a contrastive loss on student and teacher embeddings fused, sized on D_t so
D_s != D_t works: CLIP-KD's crashed)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.distributed import all_gather_with_grad
from student_trainer.losses.base import (INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, FeatureProjection, _clamped_scale,
                                         _ProjectedLoss, _ScaledProjectionLoss)
from student_trainer.losses.contrastive import _contrastive
from student_trainer.losses.inputs import _answered, _gathered, _get, _masked_mean, _refuse_routing, _teacher


class FDLoss(_ProjectedLoss):
    """Feature distillation: MSE(P(I_s), I_t) + MSE(P(T_s), T_t), mean over B·D_t elements.

    The mean over D_t makes a sample's penalty ‖P(x_s) − x_t‖² / D_t: the same weight pulls half
    as hard on a 1024-wide teacher as on a 512-wide one. CLIP-KD tuned its 2000 at D_t = 512
    (ViT-B/16), so `build_losses` scales the FD/MFD weight by D_t / `fd_reference_dim` (512):
    weight 2000 always means their per-sample penalty 2000/512 · ‖Δ‖² (for a 64-wide teacher the
    applied weight is 250). `fd_reference_dim=None` uses the weight as given.
    """

    name = "fd"
    image_key = "image_features"

    @classmethod
    def weight_factor(cls, teacher_dim: int, options: Mapping[str, Any]) -> float:
        reference = options["fd_reference_dim"]
        if reference is None:
            return 1.0
        if isinstance(reference, bool) or not isinstance(reference, int) or reference <= 0:
            raise ValueError(f"fd_reference_dim must be a positive int or None, got {reference!r}")
        return teacher_dim / reference

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        image = _get(student, self.image_key, "student", self.name)
        text = _get(student, "text_features", "student", self.name)
        t_image = _teacher(teacher, "image_features", self.name, image)
        t_text = _teacher(teacher, "text_features", self.name, text)
        rows = _answered(teacher, image)
        if rows is not None:  # per-sample teacher choice: the MSE over the rows this teacher answered
            all_rows = _gathered(teacher, "answered", rows, with_grad=False)

            def mse(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return _masked_mean((x - t).pow(2).mean(dim=1), rows, all_rows)

            loss = mse(self.projection(image, "image"), t_image) + mse(self.projection(text, "text"), t_text)
            return {f"{self.name}_loss": loss}
        loss = F.mse_loss(self.projection(image, "image"), t_image) + F.mse_loss(
            self.projection(text, "text"), t_text
        )
        return {f"{self.name}_loss": loss}


class MFDLoss(FDLoss):
    """Masked FD: FD on student["masked_image_features"] (a forward with `mask_ratio` of the
    patches dropped, CLS kept); the teacher saw the full image. The text term is FD's."""

    name = "mfd"
    image_key = "masked_image_features"

    def __init__(self, student_dim: int, teacher_dim: int, projection: FeatureProjection | None = None,
                 mask_ratio: float = 0.75):
        super().__init__(student_dim, teacher_dim, projection)
        if not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"mfd mask_ratio must be in (0, 1), got {mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)

    @classmethod
    def from_options(cls, student_dim, teacher_dim, projection, options):
        return cls(student_dim, teacher_dim, projection, mask_ratio=options["mask_ratio"])


class AFDLoss(_ScaledProjectionLoss):
    """Augmented feature distillation: contrastive loss on fused embeddings
    normalize(W_i[P(I_s); I_t]) and normalize(W_t[P(T_s); T_t]), W: Linear(2·D_t → D_t),
    with its own learnable clamped scale. Sized on D_t, so D_s != D_t works."""

    name = "afd"

    def __init__(self, student_dim: int, teacher_dim: int, projection: FeatureProjection | None = None,
                 init_scale: float = INIT_LOGIT_SCALE, max_scale: float = MAX_LOGIT_SCALE):
        super().__init__(student_dim, teacher_dim, projection, init_scale, max_scale)
        self.fuse_image = nn.Linear(2 * teacher_dim, teacher_dim)
        self.fuse_text = nn.Linear(2 * teacher_dim, teacher_dim)

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        _refuse_routing(teacher, self.name)
        image = self.projection(_get(student, "image_features", "student", self.name), "image")
        text = self.projection(_get(student, "text_features", "student", self.name), "text")
        t_image = _teacher(teacher, "image_features", self.name, image)
        t_text = _teacher(teacher, "text_features", self.name, image)
        fused_image = F.normalize(self.fuse_image(torch.cat([image, t_image], dim=1)), dim=-1)
        fused_text = F.normalize(self.fuse_text(torch.cat([text, t_text], dim=1)), dim=-1)
        all_image, all_text = all_gather_with_grad(fused_image), all_gather_with_grad(fused_text)
        scale = _clamped_scale(self.log_scale, self.max_scale)
        return {"afd_loss": _contrastive(fused_image, fused_text, all_image, all_text, scale)}
