"""Learning-rate schedule: linear warmup, then cosine decay to zero (as open_clip_train's `cosine_lr`)."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The LR at `step` (0-based). Warmup reaches `base_lr` at step `warmup_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
