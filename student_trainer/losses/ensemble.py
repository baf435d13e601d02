"""Several teachers at once: KL and CRD against the teachers' combined distribution
(`EnsembleDistributionLoss`), the feature losses once per teacher with a projection head each
(`PerTeacherLoss`). `student_trainer.losses.registry.build_losses` builds them when given more than
one teacher width; the teacher dict then holds ``teachers`` and ``teacher_weights``."""
from __future__ import annotations

import torch
from torch import nn

from student_trainer.losses.base import DistillLoss
from student_trainer.losses.inputs import (_answered, _gathered, _get, _mask_columns, _masked_mean,
                                           _optional_scale, _pair_logits, _scale, _teacher)


PER_TEACHER = ("fd", "mfd", "icl", "gd", "afd")  # one module (and one projection head) per teacher
ENSEMBLE_TARGET = ("kl", "crd")  # one module against the teachers' combined distribution
ENSEMBLE_AVERAGES = ("probs", "logits")  # loss option ensemble_average (see OPTION_DEFAULTS)


class EnsembleDistributionLoss(DistillLoss):
    """KL (open_clip's soft cross entropy) or CRD (KL(p̄ ‖ q)) against several teachers' combined
    contrastive distributions, image→text and text→image, averaged over the two directions.

    Each teacher's logits s_i·I_i·T_iᵀ (+ b_i) use its own scale and bias. "probs" (MobileCLIP2's
    default): p̄ = Σ_i w_i·σ(logits_i); "logits": p̄ = σ(Σ_i w_i·logits_i); weights sum to 1.
    With per-sample teacher choice (`answered` masks) a row's target mixes only the teachers that
    answered it (weights renormalised over them), each over the columns it answered; a row no
    teacher answered is left out. "logits" needs every teacher on every row (refused otherwise).
    """

    def __init__(self, name: str, average: str = "probs") -> None:
        super().__init__()
        if average not in ENSEMBLE_AVERAGES:
            raise ValueError(f"ensemble_average must be one of {ENSEMBLE_AVERAGES}, got {average!r}")
        self.name, self.average = name, average

    def _teacher_logits(self, t: dict, like: torch.Tensor):
        """(image→text, text→image) logits of one teacher, its row mask and its gathered column mask."""
        image = _teacher(t, "image_features", self.name, like)
        text = _teacher(t, "text_features", self.name, like)
        scale = _scale(t, "logit_scale", "teacher", self.name, like)
        bias = _optional_scale(t, "logit_bias", like)
        per_image, per_text = _pair_logits(t, image, text, scale, bias, with_grad=False)
        rows = _answered(t, like)
        columns = None if rows is None else _gathered(t, "answered", rows, with_grad=False)
        return per_image, per_text, rows, columns

    def _target(self, parts: list, weights: list[float], direction: int, like: torch.Tensor):
        """The combined target [B, N], the rows it covers ([B] float) and those of all ranks ([N])."""
        ones = torch.ones(like.shape[0], device=like.device, dtype=like.dtype)
        rows = [ones if p[2] is None else p[2] for p in parts]
        mix = torch.stack([w * r for w, r in zip(weights, rows)])  # [T, B]
        covered = (mix.sum(0) > 0).to(like.dtype)
        columns = [None if p[3] is None else w * p[3] for w, p in zip(weights, parts)]
        all_covered = None if any(c is None for c in columns) else (sum(columns) > 0).to(like.dtype)
        mix = mix / mix.sum(0).clamp(min=1e-12)
        covered = (covered, all_covered)
        if self.average == "logits":
            if any(p[2] is not None and not bool(p[2].all()) for p in parts):
                raise ValueError("ensemble_average 'logits' needs every teacher on every sample; "
                                 "with teacher labels use 'probs'")
            return sum(m[:, None] * p[direction] for m, p in zip(mix, parts)).softmax(dim=1), covered
        probs = [_mask_columns(p[direction], p[3]).softmax(dim=1) for p in parts]
        return sum(m[:, None] * q for m, q in zip(mix, probs)), covered

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        image = _get(student, "image_features", "student", self.name)
        text = _get(student, "text_features", "student", self.name)
        scale = _scale(student, "logit_scale", "student", self.name, image)
        s_img, s_txt = _pair_logits(student, image, text, scale, None, with_grad=True)
        teachers, weights = _get(teacher, "teachers", "teacher", self.name), teacher["teacher_weights"]
        parts = [self._teacher_logits(t, image) for t in teachers]
        total = 0.0
        for direction, s_logits in ((0, s_img), (1, s_txt)):
            target, covered = self._target(parts, weights, direction, image)
            log_q = s_logits.log_softmax(dim=1)
            per_row = -(target * log_q).sum(1)
            if self.name == "crd":
                per_row = torch.xlogy(target, target).sum(1) + per_row
            total = total + _masked_mean(per_row, *covered)
        return {f"{self.name}_loss": total / 2}


class PerTeacherLoss(DistillLoss):
    """A feature loss (FD, MFD, ICL, GD, AFD) once per teacher, each module with that teacher's
    projection head: Σ_i w_i·f_i·L_i, w_i the teacher weights (sum 1), f_i the loss's
    `weight_factor` at teacher i's width (FD/MFD: D_i / fd_reference_dim)."""

    def __init__(self, name: str, modules: list[nn.Module], factors: list[float]) -> None:
        super().__init__()
        self.name, self.members, self.factors = name, nn.ModuleList(modules), list(factors)
        self.needs_teacher = True
        self.mask_ratio = getattr(modules[0], "mask_ratio", None)

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        teachers, weights = _get(teacher, "teachers", "teacher", self.name), teacher["teacher_weights"]
        total = 0.0
        for module, factor, t, w in zip(self.members, self.factors, teachers, weights):
            total = total + w * factor * module(student, t)[f"{self.name}_loss"]
        return {f"{self.name}_loss": total}
