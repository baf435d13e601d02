"""What every loss reads, and how: tensors from the student and teacher dicts (teacher ones as
constants in the student's dtype), other ranks' rows gathered once per `LossSet` call, this rank's
labels among them, and the row and column masks of per-sample teacher choice (`answered`).

With one process no collective is issued (`student_trainer.distributed`), so single-process runs
work (CLIP-KD's loss crashed with one process)."""
from __future__ import annotations

from typing import Mapping

import torch

from student_trainer.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world_size


_CACHE = "_gathered"  # private per-call gather cache that LossSet.forward adds to its dict copies


# what a column or row a teacher did not answer gets in its logits: finite, so a row no teacher
# answered gives zero loss and zero gradient instead of NaN (exp(-1e4) is 0 in any float)
_MASKED_LOGIT = -1e4


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


def _refuse_routing(teacher: Mapping | None, loss: str) -> None:
    """GD and AFD need every teacher row (and single-teacher KL/CRD has no partial target): a
    teacher that left rows unanswered is refused (an all-True mask, as ensembles send, is fine)."""
    if isinstance(teacher, Mapping) and teacher.get("answered") is not None and not bool(teacher["answered"].all()):
        raise ValueError(f"loss {loss!r} does not take per-sample teacher choice (teacher labels); "
                         "kl, crd (with several teachers), fd, mfd and icl do")
