"""Exact gradient accumulation for batch-coupled losses (`accumulated_backward`): the update of
k micro-batches equals the update of one k-times-larger batch, with one micro-batch's activations
alive at a time (open_clip's distillation asserts accum_freq == 1). The train step
(`student_trainer.train.train_step`) calls it when accum_steps > 1."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


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
