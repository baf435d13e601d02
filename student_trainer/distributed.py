"""Gather utilities for losses that see the whole global batch.

Contrastive losses need every rank's embeddings as negatives. Following open_clip's
`local_loss=True, gather_with_grad=True` (the setting that scales, open_clip #894), each rank
keeps its own rows and gathers the columns; the gather carries gradients back to the rank that
produced each row, so DDP's gradient averaging yields exactly the gradient of the global loss.
Everything here degrades to the identity when torch.distributed is not initialised or has a
single rank, so the same loss code runs in one process.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a default process group with more than one rank exists."""
    return rank_and_world_size()[1] > 1


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0, gradients flowing back to each owner.

    Uses torch.distributed.nn.functional.all_gather (what open_clip uses): its backward sums
    the incoming gradients of every rank for this rank's slice. Every rank must pass the same
    shape. Returns `tensor` itself in a single process.
    """
    if not is_distributed():
        return tensor
    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        # torch marks it deprecated in favour of functional collectives; it is still the
        # autograd-aware gather that works on gloo and nccl alike.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0 without autograd (teacher outputs)."""
    if not is_distributed():
        return tensor
    _, world_size = rank_and_world_size()
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce-average `.grad` of `parameters` in place (for backward passes run outside DDP).

    Parameters without a gradient on this rank contribute zeros, so every rank issues the same
    collectives in the same order.
    """
    if not is_distributed():
        return
    _, world_size = rank_and_world_size()
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world_size)


def sum_over_ranks(counts: dict[str, float], device: torch.device) -> dict[str, float]:
    """Counters summed over every rank (one all-reduce, in float64: integers stay exact and come
    back as ints); the identity in one process.

    Every rank must pass the same keys: they are summed in sorted order.
    """
    if not is_distributed() or not counts:
        return dict(counts)
    keys = sorted(counts)
    values = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: int(round(v)) if isinstance(counts[k], int) else v for k, v in zip(keys, values.tolist())}
