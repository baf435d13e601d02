"""Interactive contrastive learning (CLIP-KD): the projected student embeddings contrasted against
the teacher's, with a learnable, clamped scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from student_trainer.losses.base import _clamped_scale, _ScaledProjectionLoss
from student_trainer.losses.contrastive import _contrastive
from student_trainer.losses.inputs import (_answered, _gathered, _get, _local_labels, _mask_columns, _masked_mean,
                                           _teacher)


class ICLLoss(_ScaledProjectionLoss):
    """Interactive contrastive learning: ½[CE(κ·P(I_s)·T_tᵀ, y) + CE(κ·P(T_s)·I_tᵀ, y)].

    κ = exp(learnable log-scale) clamped to max_scale; teacher columns gathered from all ranks.
    """

    name = "icl"

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        image = self.projection(_get(student, "image_features", "student", self.name), "image")
        text = self.projection(_get(student, "text_features", "student", self.name), "text")
        t_image = _teacher(teacher, "image_features", self.name, image)
        t_text = _teacher(teacher, "text_features", self.name, image)
        all_t_image = _gathered(teacher, "image_features", t_image, with_grad=False)
        all_t_text = _gathered(teacher, "text_features", t_text, with_grad=False)
        scale = _clamped_scale(self.log_scale, self.max_scale)
        rows = _answered(teacher, image)
        if rows is not None:  # per-sample teacher choice: its rows, against the columns it answered
            columns = _gathered(teacher, "answered", rows, with_grad=False)
            labels = _local_labels(image.shape[0], image.device)

            def ce(logits: torch.Tensor) -> torch.Tensor:
                return _masked_mean(F.cross_entropy(_mask_columns(logits, columns), labels, reduction="none"), rows,
                                    columns)

            return {"icl_loss": (ce(scale * image @ all_t_text.T) + ce(scale * text @ all_t_image.T)) / 2}
        return {"icl_loss": _contrastive(image, text, all_t_image, all_t_text, scale)}
