"""The task losses: CLIP's contrastive loss and SigLIP's sigmoid loss, each with the values and
gradients of open_clip's (`ClipLoss(local_loss=True, gather_with_grad=True)`, `SigLipLoss`), on
one or more ranks. `_contrastive` is also ICL's and AFD's loss on their own embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from student_trainer.losses.base import DistillLoss
from student_trainer.losses.inputs import _gathered, _get, _local_labels, _scale


def _contrastive(
    image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """½[CE(s·I·T_allᵀ, y) + CE(s·T·I_allᵀ, y)] over this rank's rows."""
    labels = _local_labels(image.shape[0], image.device)
    return (
        F.cross_entropy(scale * image @ all_text.T, labels)
        + F.cross_entropy(scale * text @ all_image.T, labels)
    ) / 2


class ClipLoss(DistillLoss):
    """CLIP task loss; same values and gradients as open_clip ClipLoss(local_loss, gather_with_grad)."""

    name, needs_teacher = "clip", False

    def forward(self, student: dict, teacher: dict | None = None) -> dict[str, torch.Tensor]:
        image = _get(student, "image_features", "student", self.name)
        text = _get(student, "text_features", "student", self.name)
        scale = _scale(student, "logit_scale", "student", self.name, image)
        all_image = _gathered(student, "image_features", image, with_grad=True)
        all_text = _gathered(student, "text_features", text, with_grad=True)
        return {"clip_loss": _contrastive(image, text, all_image, all_text, scale)}


class SigLipLoss(DistillLoss):
    """SigLIP task loss; same as open_clip SigLipLoss (any dist_impl) on one or more ranks.

    Each rank scores its images against every rank's texts (gathered with gradients):
    −Σ logsigmoid(±(s·I·Tᵀ + b)) / B_local, +1 only on this rank's own pairs.
    """

    name, needs_teacher = "siglip", False

    def forward(self, student: dict, teacher: dict | None = None) -> dict[str, torch.Tensor]:
        image = _get(student, "image_features", "student", self.name)
        text = _get(student, "text_features", "student", self.name)
        scale = _scale(student, "logit_scale", "student", self.name, image)
        bias = _scale(student, "logit_bias", "student", self.name, image)
        all_text = _gathered(student, "text_features", text, with_grad=True)
        logits = scale * image @ all_text.T + bias
        rows = image.shape[0]
        signs = -torch.ones_like(logits)
        signs[torch.arange(rows, device=image.device), _local_labels(rows, image.device)] = 1.0
        return {"siglip_loss": -F.logsigmoid(signs * logits).sum() / rows}
