"""Two gloo ranks (torch.multiprocessing.spawn, no Ray): every loss's per-rank value and gradients
against the single-process global batch, clip/siglip/kl against open_clip's distributed losses,
and exact gradient accumulation across ranks. The ranks are spawned once and save their
results; the assertions run in the pytest process."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from student_trainer.distributed import average_gradients
from student_trainer.losses import LOSSES, accumulated_backward, build_losses

WORLD, B, DS, DT, CLASSES = 2, 4, 8, 12, 3
N = WORLD * B
FEATURE_KEYS = ("image_features", "text_features", "masked_image_features", "logit_scale", "logit_bias")
ACCUM_WEIGHTS = {"clip": 1.0, "kl": 1.0, "fd": 2000.0}
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # two spawned ranks


def _make_inputs() -> dict:
    g = torch.Generator().manual_seed(0)

    def unit(dim: int) -> torch.Tensor:
        return F.normalize(torch.randn(N, dim, generator=g, dtype=torch.float64), dim=-1)

    student = {"image_features": unit(DS), "text_features": unit(DS), "masked_image_features": unit(DS),
               "logit_scale": torch.tensor(12.0, dtype=torch.float64),
               "logit_bias": torch.tensor(-4.0, dtype=torch.float64), "labels": torch.arange(N) % CLASSES}
    teacher = {"image_features": unit(DT), "text_features": unit(DT),
               "logit_scale": torch.tensor(60.0, dtype=torch.float64),
               "class_centroids": torch.randn(CLASSES, DT, generator=g, dtype=torch.float64)}
    return {"student": student, "teacher": teacher,
            "x": torch.randn(N, 10, generator=g, dtype=torch.float64),
            "t": torch.randn(N, 9, generator=g, dtype=torch.float64)}


def _loss_set(weights: dict):
    torch.manual_seed(0)
    return build_losses(weights, student_dim=DS, teacher_dim=DT, options={"num_classes": CLASSES}).double()


class _TinyStudent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.image = torch.nn.Linear(10, DS).double()
        self.text = torch.nn.Linear(9, DS).double()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict:
        return {"image_features": F.normalize(self.image(x), dim=-1),
                "text_features": F.normalize(self.text(t), dim=-1), "logit_scale": self.logit_scale.exp()}


def _local(data: dict, rows: slice) -> tuple[dict, dict, list[torch.Tensor]]:
    """This rank's student (fresh leaves with grad) and teacher dicts."""
    student = {}
    for key, value in data["student"].items():
        value = value[rows].clone() if value.dim() > 0 else value.clone()
        student[key] = value.requires_grad_(True) if value.is_floating_point() else value
    teacher = {k: (v[rows] if k in ("image_features", "text_features") else v) for k, v in data["teacher"].items()}
    return student, teacher, [student[k] for k in FEATURE_KEYS]


def _run_losses(data: dict, state: dict, rows: slice) -> dict:
    """Value and gradients (features, scales, heads) of each loss on `rows` of the global batch."""
    loss_set = _loss_set({name: 1.0 for name in LOSSES})
    loss_set.load_state_dict(state)
    results = {}
    for name, module in loss_set.losses.items():
        student, teacher, leaves = _local(data, rows)
        heads = dict(module.named_parameters())
        value = module(student, teacher)[f"{name}_loss"]
        grads = torch.autograd.grad(value, leaves + list(heads.values()), allow_unused=True)
        results[name] = {"value": value.detach(), "features": grads[:len(leaves)],
                         "heads": dict(zip(heads, grads[len(leaves):]))}
    return results


def _open_clip_parity(data: dict, rank: int) -> dict:
    from open_clip import loss as oc

    rows = slice(rank * B, (rank + 1) * B)
    kw = {"local_loss": True, "gather_with_grad": True, "rank": rank, "world_size": WORLD}
    out = {}
    for name in ("clip", "siglip", "kl"):
        student, teacher, _ = _local(data, rows)
        leaves = [student["image_features"], student["text_features"], student["logit_scale"]]
        ours = LOSSES[name]()(student, teacher)[f"{name}_loss"]
        if name == "clip":
            ref = oc.ClipLoss(**kw)(*leaves)
        elif name == "siglip":
            leaves.append(student["logit_bias"])
            ref = oc.SigLipLoss(rank=rank, world_size=WORLD)(*leaves)
        else:
            ref = oc.DistillClipLoss(**kw)(*leaves, teacher["image_features"], teacher["text_features"],
                                           teacher["logit_scale"], output_dict=True)["distill_loss"]
        out[name] = {"ours": (ours.detach(), torch.autograd.grad(ours, leaves)),
                     "open_clip": (ref.detach(), torch.autograd.grad(ref, leaves))}
    return out


def _accumulation(data: dict, rows: slice, micro: int | None) -> list[torch.Tensor]:
    """Gradients of student + heads for clip+kl+fd on `rows`, direct or via accumulated_backward,
    averaged over ranks like DDP would."""
    model, losses = _TinyStudent(), _loss_set(ACCUM_WEIGHTS)
    params = list(model.parameters()) + list(losses.parameters())
    x, t = data["x"][rows], data["t"][rows]
    teacher = {k: (v[rows] if k in ("image_features", "text_features") else v) for k, v in data["teacher"].items()}
    if micro is None:
        sum(losses(model(x, t), teacher).values()).backward()
    else:
        size = x.shape[0] // micro
        accumulated_backward(
            losses, lambda j: model(x[j * size:(j + 1) * size], t[j * size:(j + 1) * size]), micro, teacher)
    average_gradients(params)
    return [p.grad.clone() for p in params]


def _worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        data = torch.load(os.path.join(tmp, "inputs.pt"))
        state = torch.load(os.path.join(tmp, "losses.pt"))
        rows = slice(rank * B, (rank + 1) * B)
        result = {
            "losses": _run_losses(data, state, rows),
            "open_clip": _open_clip_parity(data, rank),
            "accum_direct": _accumulation(data, rows, None),
            "accum_micro": _accumulation(data, rows, 2),
        }
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("losses_dist"))
    data = _make_inputs()
    state = _loss_set({name: 1.0 for name in LOSSES}).state_dict()
    torch.save(data, os.path.join(tmp, "inputs.pt"))
    torch.save(state, os.path.join(tmp, "losses.pt"))
    mp.spawn(_worker, args=(tmp,), nprocs=WORLD, join=True)
    ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    return data, state, ranks


def test_every_loss_equals_the_global_batch_loss(two_ranks):
    """mean of rank values == global value; rank feature grads == WORLD × global grads (what
    the gather's backward sums); mean of rank scale/head grads == global (DDP's average)."""
    data, state, ranks = two_ranks
    assert not dist.is_initialized()
    glob = _run_losses(data, state, slice(0, N))
    for name in LOSSES:
        mean_value = sum(r["losses"][name]["value"] for r in ranks) / WORLD
        torch.testing.assert_close(mean_value, glob[name]["value"], msg=f"{name} value")
        for i, key in enumerate(FEATURE_KEYS):
            g_glob = glob[name]["features"][i]
            g_ranks = [r["losses"][name]["features"][i] for r in ranks]
            if g_glob is None:
                assert all(g is None for g in g_ranks), f"{name} {key}"
            elif g_glob.dim() == 0:
                torch.testing.assert_close(sum(g_ranks) / WORLD, g_glob, msg=f"{name} {key}")
            else:
                for rank, g in enumerate(g_ranks):
                    torch.testing.assert_close(g / WORLD, g_glob[rank * B:(rank + 1) * B], msg=f"{name} {key}")
        for head, g_glob in glob[name]["heads"].items():
            g_ranks = [r["losses"][name]["heads"][head] for r in ranks]
            torch.testing.assert_close(sum(g_ranks) / WORLD, g_glob, msg=f"{name} {head}")
    gd_values = [r["losses"]["gd"]["value"] for r in ranks]  # GD: global loss on every rank
    torch.testing.assert_close(gd_values[0], gd_values[1])
    clip_values = [r["losses"]["clip"]["value"] for r in ranks]  # local losses differ per rank
    assert not torch.allclose(clip_values[0], clip_values[1])


def test_clip_siglip_kl_match_open_clip_on_two_ranks(two_ranks):
    _, _, ranks = two_ranks
    for rank, result in enumerate(ranks):
        for name, pair in result["open_clip"].items():
            (v_ours, g_ours), (v_ref, g_ref) = pair["ours"], pair["open_clip"]
            torch.testing.assert_close(v_ours, v_ref, msg=f"rank {rank} {name}")
            for a, b in zip(g_ours, g_ref):
                torch.testing.assert_close(a, b, msg=f"rank {rank} {name} grad")


def test_accumulation_is_exact_across_ranks(two_ranks):
    data, _, ranks = two_ranks
    model, losses = _TinyStudent(), _loss_set(ACCUM_WEIGHTS)
    teacher = data["teacher"]
    sum(losses(model(data["x"], data["t"]), teacher).values()).backward()
    glob = [p.grad for p in list(model.parameters()) + list(losses.parameters())]
    for result in ranks:
        for direct, micro, g in zip(result["accum_direct"], result["accum_micro"], glob):
            torch.testing.assert_close(micro, direct)
            torch.testing.assert_close(micro, g)
