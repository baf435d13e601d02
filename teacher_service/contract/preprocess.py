"""uint8 images → model input tensors, and token context fitting.

Pure torch and shared by the teacher and the students, so both see bit-identical pixels for the
same uint8 view (PIL-based transforms differ across versions and between processes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("shortest", "squash", "longest")


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects: input size (h, w), normalisation and resampling.

    `resize_mode` follows open_clip's eval transform: "shortest" scales the short side and
    centre-crops (aspect kept), "squash" resizes straight to `image_size`, "longest" scales the
    long side and pads with zeros. All three are identical for square inputs.
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation: expected one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode: expected one of {RESIZE_MODES}, got {self.resize_mode!r}")

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}


def preprocess_spec(model) -> PreprocessSpec:
    """Read the spec open_clip attached to `model.visual.preprocess_cfg` at creation."""
    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    if not cfg:
        raise ValueError(f"{type(model).__name__} has no visual.preprocess_cfg; create it with open_clip.create_model")
    size = cfg.get("size", getattr(visual, "image_size", 224))
    size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    return PreprocessSpec(
        image_size=size,
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
    )


def to_model_input(images, spec: PreprocessSpec, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or tensor) → normalised [B, 3, h, w] in `dtype` on `device`.

    The uint8 data moves to the device first (4× less traffic than float), is resized in float32
    with antialiasing, clamped to the uint8 range (bicubic overshoots), scaled to [0, 1] and
    normalised. An input already at `spec.image_size` is not resampled at all.
    """
    x = _as_uint8_tensor(images)
    x = x.to(device=device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32)
    x = _resize(x, spec)
    x = x.clamp_(0.0, 255.0).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.to(dtype).contiguous()


def _as_uint8_tensor(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"images: expected uint8, got {images.dtype}")
        if not images.flags.writeable:  # arrays from Ray are read-only; torch warns on those
            images = images.copy()
        images = torch.from_numpy(images)
    elif not isinstance(images, torch.Tensor):
        raise ValueError(f"images: expected a uint8 numpy array or tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected shape [B, H, W, 3], got {tuple(images.shape)}")
    return images


def _resize(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    th, tw = spec.image_size
    h, w = x.shape[-2:]
    if (h, w) == (th, tw):
        return x
    if spec.resize_mode == "squash":
        return _interpolate(x, (th, tw), spec.interpolation)
    scale = max(th / h, tw / w) if spec.resize_mode == "shortest" else min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if spec.resize_mode == "shortest":
        nh, nw = max(nh, th), max(nw, tw)
        x = _interpolate(x, (nh, nw), spec.interpolation)
        top, left = (nh - th) // 2, (nw - tw) // 2
        return x[..., top:top + th, left:left + tw]
    nh, nw = min(nh, th), min(nw, tw)
    x = _interpolate(x, (nh, nw), spec.interpolation)
    top, left = (th - nh) // 2, (tw - nw) // 2
    return F.pad(x, (left, tw - nw - left, top, th - nh - top), value=0.0)


def _interpolate(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def fit_context(tokens, context_length: int):
    """Fit int64 token rows [B, L] to `context_length` like open_clip's tokenizer does.

    Shorter rows are zero padded. Longer rows are cut; a row whose EOT (its maximum id, e.g. 49407
    for SimpleTokenizer) falls beyond the cut gets its EOT written at the last position so the
    text tower still pools the EOT token. Returns the input's type (numpy or tensor).
    """
    if context_length < 1:
        raise ValueError(f"context_length: expected >= 1, got {context_length}")
    is_numpy = isinstance(tokens, np.ndarray)
    t = torch.from_numpy(np.array(tokens, dtype=np.int64, copy=True)) if is_numpy else tokens.to(torch.int64)
    if t.ndim != 2:
        raise ValueError(f"tokens: expected shape [B, L], got {tuple(t.shape)}")
    length = t.shape[1]
    if length <= context_length:
        out = F.pad(t, (0, context_length - length), value=0)
    else:
        out = t[:, :context_length].clone()
        eot_val, eot_pos = t.max(dim=1)
        cut = eot_pos >= context_length
        out[cut, -1] = eot_val[cut]
    return out.numpy() if is_numpy else out
