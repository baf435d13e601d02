"""CLIP-Embed-KD: the student's image embedding classified directly and against the teacher's
class centroids (given, cached, or computed by the loop before training). Softmax is applied once
(the reference applied it twice); the centroid logits are plain cosines by default, as in the
paper."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.losses.base import DistillLoss, _check_dims
from student_trainer.losses.inputs import _get, _scale, _teacher


class EmbedKDLoss(DistillLoss):
    """CLIP-Embed-KD: α1·CE(classifier(z), y) + α2·CE(s·cos(z, P(μ)), y).

    z = student image embedding, μ [C, D_t] teacher class centroids (teacher["class_centroids"]
    or the `class_centroids` option held as a buffer, then no teacher is needed per batch),
    P: Linear(D_t → D_s). s = `embed_scale`: 1.0 by default, the plain cosine similarities of
    the paper and its code; a number fixes another scale, "student" (or None) uses the student's
    learnable CLIP logit_scale (this project's earlier default, which sharpens the centroid
    softmax ~14–100×). Softmax is applied once, inside the cross entropy (the reference applied
    it twice). Labels from student["labels"] (or teacher["labels"]).
    """

    name = "embed_kd"

    def __init__(self, student_dim: int, teacher_dim: int, num_classes: int | None = None,
                 alpha1: float = 0.5, alpha2: float = 0.5, embed_scale: float | str | None = 1.0,
                 class_centroids: torch.Tensor | None = None):
        super().__init__()
        _check_dims(student_dim, teacher_dim)
        if class_centroids is not None:
            class_centroids = torch.as_tensor(class_centroids, dtype=torch.float32)
            if class_centroids.ndim != 2 or class_centroids.shape[1] != teacher_dim:
                raise ValueError(f"class_centroids must be [C, {teacher_dim}], got {tuple(class_centroids.shape)}")
            num_classes = num_classes or class_centroids.shape[0]
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"embed_kd needs num_classes >= 2 (option 'num_classes'), got {num_classes!r}")
        if class_centroids is not None and class_centroids.shape[0] != num_classes:
            raise ValueError(f"class_centroids has {class_centroids.shape[0]} rows, num_classes={num_classes}")
        for label, alpha in (("alpha1", alpha1), ("alpha2", alpha2)):
            if not (isinstance(alpha, (int, float)) and alpha >= 0):
                raise ValueError(f"embed_kd {label} must be a number >= 0, got {alpha!r}")
        self.num_classes, self.alpha1, self.alpha2 = num_classes, float(alpha1), float(alpha2)
        self.embed_scale = _embed_scale(embed_scale)
        self.classifier = nn.Linear(student_dim, num_classes)
        self.centroid_projection = nn.Linear(teacher_dim, student_dim)
        self.register_buffer("class_centroids", class_centroids)
        self.needs_teacher = class_centroids is None

    @classmethod
    def from_options(cls, student_dim, teacher_dim, projection, options):
        return cls(student_dim, teacher_dim, options["num_classes"], options["alpha1"], options["alpha2"],
                   options["embed_scale"], options["class_centroids"])

    def forward(self, student: dict, teacher: dict | None = None) -> dict[str, torch.Tensor]:
        z = _get(student, "image_features", "student", self.name)
        labels = student.get("labels") if student.get("labels") is not None else (teacher or {}).get("labels")
        if labels is None:
            raise KeyError("loss 'embed_kd' needs student['labels'] (or teacher['labels'])")
        if teacher is not None and teacher.get("class_centroids") is not None:
            centroids = _teacher(teacher, "class_centroids", self.name, z)
        elif self.class_centroids is not None:
            centroids = self.class_centroids.to(device=z.device, dtype=z.dtype)
        else:
            raise KeyError("loss 'embed_kd' needs teacher['class_centroids'] or the class_centroids option")
        if centroids.shape[0] != self.num_classes:
            raise ValueError(f"class_centroids has {centroids.shape[0]} rows, num_classes={self.num_classes}")
        labels = torch.as_tensor(labels, device=z.device).long()
        scale = (_scale(student, "logit_scale", "student", self.name, z) if self.embed_scale is None
                 else torch.tensor(self.embed_scale, device=z.device, dtype=z.dtype))
        anchors = F.normalize(self.centroid_projection(centroids), dim=-1)
        centroid_logits = scale * F.normalize(z, dim=-1) @ anchors.T
        loss = self.alpha1 * F.cross_entropy(self.classifier(z), labels) + self.alpha2 * F.cross_entropy(
            centroid_logits, labels
        )
        return {"embed_kd_loss": loss}


def _embed_scale(value: float | str | None) -> float | None:
    """A fixed Embed-KD centroid-logit scale, or None for the student's logit_scale ("student")."""
    if value is None or value == "student":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"embed_kd embed_scale must be a number > 0 or 'student', got {value!r}")
    return float(value)
