"""The loss registry: CLIP/SigLIP task losses and the CLIP-KD / CLIP-Embed-KD distillation losses.

Every loss module takes `(student: dict, teacher: dict)` and returns `{"<name>_loss": tensor}`
(unweighted); `LossSet` holds the modules with nonzero weight and applies the weights. Dict keys:
`image_features`, `text_features` ([B, D], L2-normalised), `logit_scale` (already exponentiated),
`logit_bias` (SigLIP), `labels` ([B], Embed-KD), teacher `class_centroids` ([C, D_t], Embed-KD),
student `masked_image_features` (MFD, see `student_trainer.masking.encode_image_masked`).

Distributed semantics (all batch-coupled losses): when torch.distributed has more than one rank,
each rank keeps its own rows and gathers the other ranks' embeddings as columns, with gradients
through the student gather (open_clip `local_loss=True, gather_with_grad=True`). Each rank's
value is its share of the global loss (their mean is the global loss) and, after DDP averages
the parameter gradients, the update equals the single-process update on the global batch.
GD is the exception that needs every row's probabilities, so it computes the global loss on
every rank from gathered features; the same DDP identity holds. With one process no
collective is issued.

Fixes over the reference code (the project's distillation-methods notes): single-process runs work;
MFD really uses the masked forward; AFD is sized for D_s != D_t; GD takes ClipLoss's own
gradients (the scale multiplies the logits, CLIP-KD divided by it), eq. 7 as written (squared L2
per embedding), in closed form ([B, B] and [B, D] only); ICL/AFD scales are
learnable log-scales, exponentiated and clamped to <= 100; Embed-KD applies softmax once (its
centroid logits are plain cosines by default, as in the paper); KL
accepts a SigLIP teacher (its logit_bias is added to the teacher logits).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world_size

INIT_LOGIT_SCALE = 1.0 / 0.07
MAX_LOGIT_SCALE = 100.0
_CACHE = "_gathered"  # private per-call gather cache that LossSet.forward adds to its dict copies

# The authors' weights, in this module's conventions (docs/design.md, "Loss weights"). FD/MFD:
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
ENSEMBLE_AVERAGES = ("probs", "logits")
# what a column or row a teacher did not answer gets in its logits: finite, so a row no teacher
# answered gives zero loss and zero gradient instead of NaN (exp(-1e4) is 0 in any float)
_MASKED_LOGIT = -1e4


# --------------------------------------------------------------------------- input access
def _get(d: Mapping | None, key: str, who: str, loss: str) -> torch.Tensor:
    if d is None or d.get(key) is None:
        raise KeyError(f"loss {loss!r} needs {who}[{key!r}]")
    return d[key]


def _teacher(d: Mapping | None, key: str, loss: str, like: torch.Tensor) -> torch.Tensor:
    """Teacher tensor as a constant in the student's dtype/device (wire embeddings are fp16)."""
    value = _get(d, key, "teacher", loss)
    return torch.as_tensor(value).detach().to(device=like.device, dtype=like.dtype)


def _scale(d: Mapping | None, key: str, who: str, loss: str, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(_get(d, key, who, loss), device=like.device)
    value = value.to(like.dtype)
    return value.detach() if who == "teacher" else value


def _optional_scale(d: Mapping | None, key: str, like: torch.Tensor) -> torch.Tensor | None:
    if d is None or d.get(key) is None:
        return None
    return torch.as_tensor(d[key], device=like.device).to(like.dtype).detach()


def _gathered(d: Mapping, key: str, value: torch.Tensor, *, with_grad: bool) -> torch.Tensor:
    """All ranks' `value` (rows in rank order), memoised per LossSet call so losses share gathers."""
    cache = d.get(_CACHE) if isinstance(d, Mapping) else None
    cache_key = (key, with_grad)
    if cache is not None and cache_key in cache:
        return cache[cache_key]
    out = all_gather_with_grad(value) if with_grad else all_gather_no_grad(value)
    if cache is not None:
        cache[cache_key] = out
    return out


def _local_labels(num_rows: int, device: torch.device) -> torch.Tensor:
    """Targets of this rank's rows among the gathered columns (offset by rank * rows)."""
    rank, _ = rank_and_world_size()
    return torch.arange(num_rows, device=device) + num_rows * rank


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


def _pair_logits(
    d: Mapping, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
    bias: torch.Tensor | None, *, with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image→text, text→image) logits of this rank's rows against all ranks' columns."""
    all_image = _gathered(d, "image_features", image, with_grad=with_grad)
    all_text = _gathered(d, "text_features", text, with_grad=with_grad)
    per_image = scale * image @ all_text.T
    per_text = scale * text @ all_image.T
    if bias is not None:
        per_image, per_text = per_image + bias, per_text + bias
    return per_image, per_text


def _soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """−Σ σ(t)·log σ(s), mean over rows (open_clip DistillClipLoss.dist_loss)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def _answered(d: Mapping, like: torch.Tensor) -> torch.Tensor | None:
    """A teacher's per-row mask (per-sample teacher choice) as a float [B], or None: all rows."""
    value = d.get("answered") if isinstance(d, Mapping) else None
    return None if value is None else torch.as_tensor(value, device=like.device).to(like.dtype)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, all_mask: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of the mean of `values` [B] over the rows of `mask`: Σ mask·values over
    (rows counted on all ranks, `all_mask` gathered, / world size), so the ranks' mean is the
    global batch's masked mean, as for the unmasked losses. 0 when no row counts (still in the graph)."""
    all_mask = mask if all_mask is None else all_mask
    per_rank = all_mask.sum() * mask.numel() / all_mask.numel()
    return (values * mask).sum() / per_rank.clamp(min=1e-12)


def _mask_columns(logits: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """Logits with the columns a teacher did not answer pushed out of every softmax."""
    if columns is None:
        return logits
    return logits.masked_fill(columns[None, :] == 0, _MASKED_LOGIT)


def clip_loss_grads(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of open_clip's ClipLoss ½[CE(s·I·Tᵀ, y) + CE(s·T·Iᵀ, y)] (mean over
    the N rows) w.r.t. every image and text embedding: CLIP-KD appendix eq. 5–6 with τ = 1/s.

    With P = row-softmax(s·I·Tᵀ) (image→text), Qᵀ = column-softmax(s·I·Tᵀ) (text→image) and
    G = P + Qᵀ − 2·Id: ∂L/∂I = s·G·T / 2N and ∂L/∂T = s·Gᵀ·I / 2N. Each row holds both
    directions, the query side (its own softmax row) and the key side (its column in the other
    direction's softmax). Only [N, N] and [N, D] tensors (CLIP-KD built [N, D, N]); the result is
    differentiable, which GD needs to train through the student's gradients.
    """
    if image.shape != text.shape:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must match")
    num = image.shape[0]
    logits = scale * image @ text.T
    eye = torch.eye(num, device=logits.device, dtype=logits.dtype)
    weights = (logits.softmax(dim=1) + logits.softmax(dim=0) - 2 * eye) * (scale / (2 * num))
    return weights @ text, weights.T @ image


def _learnable_log_scale(init_scale: float) -> nn.Parameter:
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
    return nn.Parameter(torch.tensor(math.log(init_scale)))


def _clamped_scale(log_scale: torch.Tensor, max_scale: float) -> torch.Tensor:
    """exp(log_scale) clamped to max_scale (CLIP-KD used the raw parameter, unbounded)."""
    return log_scale.exp().clamp(max=max_scale)


# --------------------------------------------------------------------------- heads
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


# --------------------------------------------------------------------------- loss modules
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


class FDLoss(DistillLoss):
    """Feature distillation: MSE(P(I_s), I_t) + MSE(P(T_s), T_t), mean over B·D_t elements.

    The mean over D_t makes a sample's penalty ‖P(x_s) − x_t‖² / D_t: the same weight pulls half
    as hard on a 1024-wide teacher as on a 512-wide one. CLIP-KD tuned its 2000 at D_t = 512
    (ViT-B/16), so `build_losses` scales the FD/MFD weight by D_t / `fd_reference_dim` (512):
    weight 2000 always means their per-sample penalty 2000/512 · ‖Δ‖² (for a 64-wide teacher the
    applied weight is 250). `fd_reference_dim=None` uses the weight as given.
    """

    name, uses_projection = "fd", True
    image_key = "image_features"

    def __init__(self, student_dim: int, teacher_dim: int, projection: FeatureProjection | None = None):
        super().__init__()
        self.projection = projection if projection is not None else FeatureProjection(student_dim, teacher_dim)

    @classmethod
    def from_options(cls, student_dim, teacher_dim, projection, options):
        return cls(student_dim, teacher_dim, projection)

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


class _ScaledProjectionLoss(DistillLoss):
    """ICL and AFD: the shared student→teacher projection plus their own learnable, clamped scale."""

    uses_projection = True

    def __init__(self, student_dim: int, teacher_dim: int, projection: FeatureProjection | None = None,
                 init_scale: float = INIT_LOGIT_SCALE, max_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        self.projection = projection if projection is not None else FeatureProjection(student_dim, teacher_dim)
        self.log_scale = _learnable_log_scale(init_scale)
        self.max_scale = float(max_scale)

    @classmethod
    def from_options(cls, student_dim, teacher_dim, projection, options):
        return cls(student_dim, teacher_dim, projection, options["init_scale"], options["max_scale"])


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


class GDLoss(DistillLoss):
    """Gradient distillation, CLIP-KD appendix eq. 5–7: with L the ClipLoss of one model (its
    own scale; `clip_loss_grads`), L_GD = 1/N · Σ_k (‖∂L_T/∂v_k − ∂L_S/∂v_k‖² + ‖∂L_T/∂s_k −
    ∂L_S/∂s_k‖²) over the N image (v) and text (s) embeddings: squared L2 over D, both
    directions already averaged inside ClipLoss. Student gradients are taken at P(·).

    Computed on the global batch (gathered) on every rank, because an embedding's key-side
    gradient sums over every row; a SigLIP teacher's scalar bias does not change its softmaxes.

    Weight (DEFAULT_WEIGHTS["gd"] = 2e8 / (512 · 100⁴) = 1/256): CLIP-KD's 1e8 multiplied four
    per-element MSEs of gradients computed as (softmax(C/s) − Y)·K / (s·N): the scale where a
    temperature belongs, so each gradient is about s² too small (and its softmax nearly
    uniform). Undoing s⁴ (s = 100, their teacher's scale and the clamp), the mean over D (×1/D,
    D_t = 512) and the four unaveraged terms (≈ 2·N·L_GD, the two directions' gradients of an
    embedding being nearly parallel) gives 1e8 · 2 / (D · s⁴). Measured at N = 1024, D = 512,
    s = 100: their term / L_GD = 0.003–0.004. Their GD was weak, and so is this weight: L_GD
    grows like s²/N² and is about 0.2 on random unit features at B = D = 64, s = 1/0.07
    (docs/design.md, "Loss weights").
    """

    name, uses_projection = "gd", True

    def __init__(self, student_dim: int, teacher_dim: int, projection: FeatureProjection | None = None):
        super().__init__()
        self.projection = projection if projection is not None else FeatureProjection(student_dim, teacher_dim)

    @classmethod
    def from_options(cls, student_dim, teacher_dim, projection, options):
        return cls(student_dim, teacher_dim, projection)

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        _refuse_routing(teacher, self.name)
        image = self.projection(_get(student, "image_features", "student", self.name), "image")
        text = self.projection(_get(student, "text_features", "student", self.name), "text")
        scale = _scale(student, "logit_scale", "student", self.name, image)
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
        t_image = _teacher(teacher, "image_features", self.name, image)
        t_text = _teacher(teacher, "text_features", self.name, image)
        t_scale = _scale(teacher, "logit_scale", "teacher", self.name, image)
        all_t_image = _gathered(teacher, "image_features", t_image, with_grad=False)
        all_t_text = _gathered(teacher, "text_features", t_text, with_grad=False)
        s_image, s_text = clip_loss_grads(all_image, all_text, scale)
        with torch.no_grad():
            t_grad_image, t_grad_text = clip_loss_grads(all_t_image, all_t_text, t_scale)
        squared = (s_image - t_grad_image).pow(2).sum() + (s_text - t_grad_text).pow(2).sum()
        return {"gd_loss": squared / all_image.shape[0]}


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


def _refuse_routing(teacher: Mapping | None, loss: str) -> None:
    """GD and AFD need every teacher row (and single-teacher KL/CRD has no partial target): a
    teacher that left rows unanswered is refused (an all-True mask, as ensembles send, is fine)."""
    if isinstance(teacher, Mapping) and teacher.get("answered") is not None and not bool(teacher["answered"].all()):
        raise ValueError(f"loss {loss!r} does not take per-sample teacher choice (teacher labels); "
                         "kl, crd (with several teachers), fd, mfd and icl do")


def _embed_scale(value: float | str | None) -> float | None:
    """A fixed Embed-KD centroid-logit scale, or None for the student's logit_scale ("student")."""
    if value is None or value == "student":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"embed_kd embed_scale must be a number > 0 or 'student', got {value!r}")
    return float(value)


LOSSES: dict[str, type[nn.Module]] = {
    cls.name: cls
    for cls in (ClipLoss, SigLipLoss, KLDistillLoss, CRDLoss, FDLoss, MFDLoss, ICLLoss, GDLoss, AFDLoss, EmbedKDLoss)
}


# --------------------------------------------------------------------------- several teachers
PER_TEACHER = ("fd", "mfd", "icl", "gd", "afd")  # one module (and one projection head) per teacher
ENSEMBLE_TARGET = ("kl", "crd")  # one module against the teachers' combined distribution


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


# --------------------------------------------------------------------------- the set
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


# --------------------------------------------------------------------------- accumulation
def accumulated_backward(
    loss_set: nn.Module,
    forward_micro: Callable[[int], dict[str, torch.Tensor]],
    num_micro: int,
    teacher: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Exact gradient accumulation for batch-coupled losses; returns detached loss values.

    Contrastive/KL/GD losses couple all samples of a batch, so summing per-micro-batch losses is
    not the big-batch loss. Instead (the GradCache scheme; open_clip's accum_freq recomputes the
    loss k times and gives the shared logit_scale k times its gradient):
      1. run `forward_micro(j)` for j < num_micro without grad and cache the student dicts;
      2. compute `loss_set` once on the concatenated features (leaf tensors), backward: this
         gives the LossSet heads their gradient and the gradient of every cached feature;
      3. recompute each `forward_micro(j)` with grad and backpropagate its slice of the feature
         gradient (0-dim entries such as logit_scale from micro-batch 0 only).
    Only one micro-batch's activations are alive at a time. `forward_micro` must be
    deterministic (seed any masking/dropout per micro-batch) and return [b, ...] tensors plus
    0-dim ones (logit_scale, logit_bias). `teacher` holds the whole k·b batch. Under DDP run
    this inside `ddp_model.no_sync()` and then call
    `student_trainer.distributed.average_gradients(all trained parameters)`.
    """
    if not isinstance(num_micro, int) or num_micro < 1:
        raise ValueError(f"num_micro must be an int >= 1, got {num_micro!r}")
    with torch.no_grad():
        cached = [forward_micro(j) for j in range(num_micro)]
    leaves: dict[str, Any] = {}
    for key, value in cached[0].items():
        if not torch.is_tensor(value):
            leaves[key] = value
            continue
        merged = value if value.dim() == 0 else torch.cat([c[key] for c in cached], dim=0)
        merged = merged.detach()
        leaves[key] = merged.requires_grad_(True) if merged.is_floating_point() else merged
    losses = loss_set(leaves, teacher)
    total = sum(losses.values())
    total.backward()
    offset = 0
    for j in range(num_micro):
        out = forward_micro(j)
        size = next(v.shape[0] for v in cached[j].values() if torch.is_tensor(v) and v.dim() > 0)
        outputs, grads = [], []
        for key, leaf in leaves.items():
            if not (torch.is_tensor(leaf) and leaf.requires_grad and leaf.grad is not None):
                continue
            if not (torch.is_tensor(out.get(key)) and out[key].requires_grad):
                continue
            if leaf.dim() > 0:
                outputs.append(out[key])
                grads.append(leaf.grad[offset:offset + size])
            elif j == 0:
                outputs.append(out[key])
                grads.append(leaf.grad)
        if outputs:
            torch.autograd.backward(outputs, grads)
        offset += size
    result = {key: value.detach() for key, value in losses.items()}
    result["loss"] = total.detach()
    return result
