"""Logit distillation: the student's image→text and text→image distributions matched to one
teacher's, as open_clip's DistillClipLoss (KL) and CLIP-KD's CRD. A SigLIP teacher works: its
logit_bias is added to its logits (open_clip's DistillClipLoss takes none). Several teachers:
`student_trainer.losses.ensemble.EnsembleDistributionLoss`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from student_trainer.losses.base import DistillLoss
from student_trainer.losses.inputs import (_get, _optional_scale, _pair_logits, _refuse_routing, _scale,
                                           _teacher)


def _soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """−Σ σ(t)·log σ(s), mean over rows (open_clip DistillClipLoss.dist_loss)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


class KLDistillLoss(DistillLoss):
    """OpenCLIP DistillClipLoss: ½[Σ −σ(teacher)·log σ(student)] for image→text and text→image.

    Teacher logits use the teacher's own scale, plus its logit_bias for a SigLIP teacher (a
    scalar bias cancels in the row softmax, so a SigLIP teacher's targets are well defined).
    """

    name = "kl"

    def _logits(self, student: dict, teacher: dict):
        _refuse_routing(teacher, self.name)
        image = _get(student, "image_features", "student", self.name)
        text = _get(student, "text_features", "student", self.name)
        scale = _scale(student, "logit_scale", "student", self.name, image)
        s_img, s_txt = _pair_logits(student, image, text, scale, None, with_grad=True)
        t_image = _teacher(teacher, "image_features", self.name, image)
        t_text = _teacher(teacher, "text_features", self.name, image)
        t_scale = _scale(teacher, "logit_scale", "teacher", self.name, image)
        t_bias = _optional_scale(teacher, "logit_bias", image)
        t_img, t_txt = _pair_logits(teacher, t_image, t_text, t_scale, t_bias, with_grad=False)
        return s_img, s_txt, t_img, t_txt

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        s_img, s_txt, t_img, t_txt = self._logits(student, teacher)
        loss = (_soft_cross_entropy(t_img, s_img) + _soft_cross_entropy(t_txt, s_txt)) / 2
        return {"kl_loss": loss}


class CRDLoss(KLDistillLoss):
    """CLIP-KD contrastive relational distillation: ½[KL(σ_t ‖ σ_s) + transpose], temperature 1."""

    name = "crd"

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        s_img, s_txt, t_img, t_txt = self._logits(student, teacher)

        def kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return F.kl_div(s.log_softmax(1), t.log_softmax(1), reduction="batchmean", log_target=True)

        return {"crd_loss": (kl(t_img, s_img) + kl(t_txt, s_txt)) / 2}
