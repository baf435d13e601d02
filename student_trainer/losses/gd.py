"""Gradient distillation (CLIP-KD appendix eq. 5–7): the student's ClipLoss gradients w.r.t. its
embeddings matched to the teacher's, from open_clip ClipLoss's own gradients in closed form
(`clip_loss_grads`): the scale multiplies the logits (CLIP-KD divided by it), eq. 7 as written
(squared L2 per embedding), and only [B, B] and [B, D] tensors."""
from __future__ import annotations

import torch

from student_trainer.distributed import all_gather_with_grad
from student_trainer.losses.base import _ProjectedLoss
from student_trainer.losses.inputs import _gathered, _get, _refuse_routing, _scale, _teacher


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


class GDLoss(_ProjectedLoss):
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

    name = "gd"

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
