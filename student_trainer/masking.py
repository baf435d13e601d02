"""Masked image forward for MFD (masked feature distillation).

MFD trains the student on an image with a random share of its patch tokens removed (MAE style,
the CLS token kept) while the teacher sees the full image. CLIP-KD's reference code computed the
masked forward and then overwrote it, so masking had no effect; here the masked forward is a
separate call whose output the loss consumes. The masking reuses open_clip's patch-dropout hook
(`VisionTransformer.patch_dropout`, applied after positional embeddings) by swapping in a module
that always drops (also in eval mode) and can draw from a given generator, then restores it.

Reproducible masks: exact gradient accumulation recomputes each micro-batch's forward, so the
mask must not depend on how a step's batch is split. `patch_noise` draws the noise of a whole
step's batch from one seed; each micro-batch passes its rows' slice as `noise`, so k micro-batches
of b and one batch of k·b drop the same patches of the same samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchMask(nn.Module):
    """Keep the CLS token and a random `1 - mask_ratio` share of the patch tokens of each image."""

    def __init__(self, mask_ratio: float, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> None:
        super().__init__()
        _check_ratio(mask_ratio)
        if noise is not None and generator is not None:
            raise ValueError("PatchMask takes a generator or precomputed noise, not both")
        self.mask_ratio = float(mask_ratio)
        self.generator = generator
        self.noise = noise

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask_ratio == 0.0:
            return tokens
        cls_token, patches = tokens[:, :1], tokens[:, 1:]
        batch, num_patches, width = patches.shape
        num_keep = max(1, round(num_patches * (1.0 - self.mask_ratio)))
        if self.noise is not None:
            if tuple(self.noise.shape) != (batch, num_patches):
                raise ValueError(f"mask noise has shape {tuple(self.noise.shape)}, the image tokens need "
                                 f"{(batch, num_patches)} (batch, patches)")
            noise = self.noise
        else:
            rand_device = self.generator.device if self.generator is not None else tokens.device
            noise = torch.rand(batch, num_patches, generator=self.generator, device=rand_device)
        keep = noise.argsort(dim=1)[:, :num_keep].to(tokens.device)
        kept = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([cls_token, kept], dim=1)


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")


def _vision_tower(model: nn.Module) -> nn.Module:
    """The open_clip VisionTransformer inside `model` (CLIP, CustomTextCLIP, DDP-wrapped or bare)."""
    model = getattr(model, "module", model)
    visual = getattr(model, "visual", model)
    if not (hasattr(visual, "patch_dropout") and hasattr(visual, "class_embedding")):
        raise TypeError(
            "encode_image_masked needs an open_clip VisionTransformer image tower (with "
            f"patch_dropout and a CLS token); got {type(visual).__name__}"
        )
    return visual


def num_patches(model: nn.Module) -> int:
    """Patch tokens per image of the model's VisionTransformer (positional embeddings minus CLS)."""
    return int(_vision_tower(model).positional_embedding.shape[0]) - 1


def patch_noise(model: nn.Module, rows: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform noise [rows, patches] from `seed` (CPU generator, so every device draws the same).

    Row i ranks the patches of sample i: the lowest `1 - mask_ratio` share are kept.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    generator = torch.Generator().manual_seed(int(seed) % (2**63))
    return torch.rand(rows, num_patches(model), generator=generator).to(device)


def encode_image_masked(
    model: nn.Module,
    images: torch.Tensor,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """L2-normalised image features of `model` with `mask_ratio` of the patch tokens dropped.

    `model` is an open_clip CLIP model (or its VisionTransformer, or either wrapped in DDP).
    mask_ratio=0 gives exactly the unmasked features. Pass a seeded `generator`, or the rows'
    slice of `patch_noise(...)` as `noise` ([B, patches]), to make the mask reproducible (needed
    when the forward is recomputed, e.g. for gradient accumulation).
    Not thread-safe: the tower's patch_dropout attribute is swapped for the call.
    """
    _check_ratio(mask_ratio)
    inner = getattr(model, "module", model)
    visual = _vision_tower(inner)
    saved = visual.patch_dropout
    visual.patch_dropout = PatchMask(mask_ratio, generator, noise)
    try:
        if hasattr(inner, "encode_image"):
            features = inner.encode_image(images)
        else:
            features = visual(images)
    finally:
        visual.patch_dropout = saved
    if isinstance(features, tuple):  # a tower built with output_tokens=True
        features = features[0]
    return F.normalize(features, dim=-1)
