"""The registry: every loss by name with its default weight and options, the weighted set of one
run (`LossSet`), and `build_losses`, which builds it from a run's weights and options (one teacher
or several)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from student_trainer.losses.base import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, FeatureProjection, _check_dims
from student_trainer.losses.contrastive import ClipLoss, SigLipLoss
from student_trainer.losses.embed_kd import EmbedKDLoss
from student_trainer.losses.ensemble import ENSEMBLE_TARGET, PER_TEACHER, EnsembleDistributionLoss, PerTeacherLoss
from student_trainer.losses.feature import AFDLoss, FDLoss, MFDLoss
from student_trainer.losses.gd import GDLoss
from student_trainer.losses.icl import ICLLoss
from student_trainer.losses.inputs import _CACHE
from student_trainer.losses.logit_distill import CRDLoss, KLDistillLoss


# The authors' weights, in this package's conventions (docs/design.md, "Loss weights"). FD/MFD:
# CLIP-KD's 2000, tuned at D_t = 512 and scaled by D_t / fd_reference_dim when built (see
# FDLoss). GD: what CLIP-KD's 1e8 stands for, 2e8 / (D_t · s⁴) at D_t = 512, s = 100 (see
# GDLoss). AFD: none published, 1.
DEFAULT_WEIGHTS: dict[str, float] = {
    "clip": 1.0,
    "siglip": 1.0,
    "kl": 1.0,
    "crd": 1.0,
    "fd": 2000.0,
    "mfd": 2000.0,
    "icl": 1.0,
    "gd": 2e8 / (512 * 100**4),  # = 1/256
    "afd": 1.0,
    "embed_kd": 1.0,
}

OPTION_DEFAULTS: dict[str, Any] = {
    "mask_ratio": 0.75,  # mfd: share of patch tokens dropped in the student's masked forward
    "fd_reference_dim": 512,  # fd, mfd: weights are scaled by D_t / this when built; None: used as given
    "init_scale": INIT_LOGIT_SCALE,  # icl, afd: initial (exponentiated) learnable logit scale
    "max_scale": MAX_LOGIT_SCALE,  # icl, afd: clamp of the exponentiated scale
    "num_classes": None,  # embed_kd: classifier width (required, or taken from class_centroids)
    "alpha1": 0.5,  # embed_kd: weight of the classifier cross entropy
    "alpha2": 0.5,  # embed_kd: weight of the centroid cross entropy
    "embed_scale": 1.0,  # embed_kd: centroid-logit scale; 1.0 = plain cosine (the paper), "student" = its logit_scale
    "class_centroids": None,  # embed_kd: [C, D_t] centroids held as a buffer (no teacher in loop)
    "centroid_samples": 100,  # embed_kd: N, train samples per class averaged into a centroid (the loop)
    # kl, crd with several teachers: the target is the teachers' weighted mean distribution
    # ("probs", averaged after softmax: MobileCLIP2's default) or the softmax of their weighted mean
    # logits ("logits"); each teacher's logits use its own scale (and bias)
    "ensemble_average": "probs",
}


LOSSES: dict[str, type[nn.Module]] = {
    cls.name: cls
    for cls in (ClipLoss, SigLipLoss, KLDistillLoss, CRDLoss, FDLoss, MFDLoss, ICLLoss, GDLoss, AFDLoss, EmbedKDLoss)
}


def _build_ensemble(active: dict[str, float], student_dim: int, teacher_dims: list[int],
                    opts: dict) -> tuple[dict, dict]:
    """Modules and applied weights of a run with several teachers (`build_losses`)."""
    if "embed_kd" in active:
        raise ValueError("embed_kd takes one teacher's class centroids: not available with several teachers")
    heads = [FeatureProjection(student_dim, d) if any(LOSSES[n].uses_projection for n in active) else None
             for d in teacher_dims]
    modules, applied = {}, dict(active)
    for name in active:
        cls = LOSSES[name]
        if name in ENSEMBLE_TARGET:
            modules[name] = EnsembleDistributionLoss(name, opts["ensemble_average"])
        elif name in PER_TEACHER:
            members = [cls.from_options(student_dim, d, head, opts) for d, head in zip(teacher_dims, heads)]
            modules[name] = PerTeacherLoss(name, members, [cls.weight_factor(d, opts) for d in teacher_dims])
        else:
            modules[name] = cls.from_options(student_dim, teacher_dims[0], None, opts)
    return modules, applied


class LossSet(nn.Module):
    """The weighted losses of one run. Learnable heads are submodules: put them in the optimizer
    and wrap student + LossSet in one DDP module so DDP syncs them.

    needs_teacher: whether per-batch teacher outputs are needed (False for clip/siglip alone).
    mask_ratio: set when "mfd" is used; the loop must then add student["masked_image_features"]
    (`student_trainer.masking.encode_image_masked`).
    """

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float]) -> None:
        super().__init__()
        if set(losses) != set(weights):
            raise ValueError(f"losses {sorted(losses)} and weights {sorted(weights)} differ")
        self.losses = nn.ModuleDict(dict(losses))
        self.weights = {name: float(weights[name]) for name in losses}
        self.needs_teacher = any(getattr(module, "needs_teacher", True) for module in losses.values())
        self.mask_ratio = losses["mfd"].mask_ratio if "mfd" in losses else None

    def forward(self, student: dict, teacher: dict | None = None) -> dict[str, torch.Tensor]:
        if self.needs_teacher and not teacher:
            raise ValueError(f"losses {sorted(self.losses)} need teacher outputs, got {teacher!r}")
        student = {**student, _CACHE: {}}
        teacher = {**(teacher or {}), _CACHE: {}}
        if "teachers" in teacher:  # an ensemble: each teacher's gathers memoised on its own
            teacher["teachers"] = [{**t, _CACHE: {}} for t in teacher["teachers"]]
        out: dict[str, torch.Tensor] = {}
        for name, module in self.losses.items():
            for key, value in module(student, teacher).items():
                out[key] = self.weights[name] * value
        return out


def losses_needing_teacher(weights: Mapping[str, float], centroids_given: bool) -> list[str]:
    """The active losses of `weights` that need per-batch teacher outputs, as their `LossSet` will
    say (known before it is built): every distillation loss, but Embed-KD given its class centroids
    reads those instead; clip and siglip none."""
    return [name for name, weight in weights.items()
            if weight and LOSSES[name].needs_teacher and not (name == "embed_kd" and centroids_given)]


def build_losses(
    weights: Mapping[str, float], *, student_dim: int, teacher_dim: int, options: Mapping[str, Any] | None = None,
    teacher_dims: list[int] | None = None,
) -> LossSet:
    """A LossSet with one module per nonzero weight, in registry order (so every rank issues the
    same collectives in the same order). Each weight is multiplied by its loss's `weight_factor`
    (FD/MFD: D_t / fd_reference_dim); LossSet.weights holds what is applied. Options: see
    OPTION_DEFAULTS.

    `teacher_dims` (more than one: an ensemble, whose teacher dict holds ``teachers`` and
    ``teacher_weights``): kl and crd target the teachers' combined distribution
    (`EnsembleDistributionLoss`), the feature losses run once per teacher with a projection head
    per teacher (`PerTeacherLoss`, weight factors applied there)."""
    _check_dims(student_dim, teacher_dim)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping name -> weight, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown:
        raise ValueError(f"unknown loss names {unknown}; known: {sorted(LOSSES)}")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of loss {name!r} must be a finite number >= 0, got {weight!r}")
    opts = dict(OPTION_DEFAULTS)
    unknown = sorted(set(options or {}) - set(OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown loss options {unknown}; known: {sorted(OPTION_DEFAULTS)}")
    opts.update(options or {})
    active = {name: float(weights[name]) for name in LOSSES if weights.get(name, 0) != 0}
    if not active:
        raise ValueError(f"no loss has a nonzero weight in {dict(weights)!r}")
    if teacher_dims is not None and len(teacher_dims) > 1:
        for dim in teacher_dims:
            _check_dims(student_dim, dim)
        modules, applied = _build_ensemble(active, student_dim, list(teacher_dims), opts)
        return LossSet(modules, applied)
    needs_projection = any(LOSSES[name].uses_projection for name in active)
    projection = FeatureProjection(student_dim, teacher_dim) if needs_projection else None
    modules = {name: LOSSES[name].from_options(student_dim, teacher_dim, projection, opts) for name in active}
    applied = {name: weight * LOSSES[name].weight_factor(teacher_dim, opts) for name, weight in active.items()}
    return LossSet(modules, applied)
