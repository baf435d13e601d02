"""Ensemble losses on two gloo ranks (torch.multiprocessing.spawn, no Ray): with several teachers
and per-sample teacher choice spread unevenly over the ranks, the ranks' mean value is the global
batch's value and DDP's averaged gradients are the global ones, as for the single-teacher losses."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from student_trainer.losses import build_losses

WORLD, B, DS = 2, 4, 8
DIMS = (12, 6)
N = WORLD * B
WEIGHTS = {"kl": 1.0, "crd": 1.0, "fd": 100.0, "icl": 1.0}
# teacher 1 answers 3 rows of rank 0 and 1 of rank 1: per-rank means would weigh them unequally
ANSWERED = [torch.ones(N, dtype=torch.bool), torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)]
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # two spawned ranks


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)

    def unit(dim: int) -> torch.Tensor:
        return F.normalize(torch.randn(N, dim, generator=g, dtype=torch.float64), dim=-1)

    student = {"image_features": unit(DS), "text_features": unit(DS),
               "logit_scale": torch.tensor(12.0, dtype=torch.float64)}
    teachers = [{"image_features": unit(d), "text_features": unit(d),
                 "logit_scale": torch.tensor(s, dtype=torch.float64)} for d, s in zip(DIMS, (70.0, 60.0))]
    return {"student": student, "teachers": teachers}


def _loss_set():
    torch.manual_seed(0)
    return build_losses(WEIGHTS, student_dim=DS, teacher_dim=DIMS[0], teacher_dims=list(DIMS)).double()


def _run(data: dict, state: dict, rows: slice) -> dict:
    loss_set = _loss_set()
    loss_set.load_state_dict(state)
    results = {}
    for name, module in loss_set.losses.items():
        student = {k: (v[rows].clone().requires_grad_(True) if v.dim() else v.clone())
                   for k, v in data["student"].items()}
        teachers = [{**{k: (v[rows] if v.dim() else v) for k, v in t.items()}, "answered": mask[rows]}
                    for t, mask in zip(data["teachers"], ANSWERED)]
        value = module(student, {"teachers": teachers, "teacher_weights": [0.4, 0.6]})[f"{name}_loss"]
        leaves = [student["image_features"], student["text_features"]]
        heads = dict(module.named_parameters())
        grads = torch.autograd.grad(value, leaves + list(heads.values()), allow_unused=True)
        results[name] = {"value": value.detach(), "features": grads[:2], "heads": dict(zip(heads, grads[2:]))}
    return results


def _worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        data, state = torch.load(os.path.join(tmp, "inputs.pt")), torch.load(os.path.join(tmp, "losses.pt"))
        torch.save(_run(data, state, slice(rank * B, (rank + 1) * B)), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ensemble_losses_on_two_ranks_equal_the_global_batch(tmp_path):
    data, state = _inputs(), _loss_set().state_dict()
    torch.save(data, tmp_path / "inputs.pt")
    torch.save(state, tmp_path / "losses.pt")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    glob = _run(data, state, slice(0, N))
    for name in WEIGHTS:
        torch.testing.assert_close(sum(r[name]["value"] for r in ranks) / WORLD, glob[name]["value"], msg=name)
        for i in range(2):  # a gathered feature's gradient: each rank holds WORLD × its rows' global gradient
            for rank, result in enumerate(ranks):
                torch.testing.assert_close(result[name]["features"][i] / WORLD,
                                           glob[name]["features"][i][rank * B:(rank + 1) * B], msg=name)
        for head, g in glob[name]["heads"].items():
            torch.testing.assert_close(sum(r[name]["heads"][head] for r in ranks) / WORLD, g, msg=f"{name} {head}")
