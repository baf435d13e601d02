"""Every loss of the registry on the GPU against CPU fp32: the value and the gradients of the
student's features and scales and of the loss's own heads, in fp32 (tight) and under autocast
(loose), where the student's features reach the loss in the autocast dtype as they do from a
student forward under AMP. On CPU (the dry run) the same comparison runs CPU against CPU, with
bfloat16 autocast."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

FEATURES = ("image_features", "text_features", "masked_image_features")
SCALES = ("logit_scale", "logit_bias")


def loss_inputs(batch: int, student_dim: int, teacher_dim: int, classes: int, seed: int) -> tuple[dict, dict]:
    """CPU fp32 student (unit rows, scales) and teacher dicts that every registry loss reads."""
    g = torch.Generator().manual_seed(seed)

    def unit(dim: int) -> torch.Tensor:
        return F.normalize(torch.randn(batch, dim, generator=g), dim=-1)

    student = {**{k: unit(student_dim) for k in FEATURES}, "logit_scale": torch.tensor(12.0),
               "logit_bias": torch.tensor(-4.0), "labels": torch.arange(batch) % classes}
    teacher = {"image_features": unit(teacher_dim), "text_features": unit(teacher_dim),
               "logit_scale": torch.tensor(60.0), "class_centroids": torch.randn(classes, teacher_dim, generator=g)}
    return student, teacher


def loss_set(student_dim: int, teacher_dim: int, classes: int, seed: int):
    """One module per registry loss, with seeded heads."""
    from student_trainer.losses import LOSSES, build_losses

    torch.manual_seed(seed)
    return build_losses({name: 1.0 for name in LOSSES}, student_dim=student_dim, teacher_dim=teacher_dim,
                        options={"num_classes": classes})


def evaluate(module: torch.nn.Module, name: str, student: dict, teacher: dict, device: torch.device,
             autocast: torch.dtype | None) -> list[torch.Tensor | None]:
    """[value, gradient of each student feature and scale, of each head parameter] on `device`,
    returned on CPU in fp32. Under `autocast` the features enter the loss in that dtype."""
    module = copy.deepcopy(module).to(device)
    leaves = {k: v.to(device).requires_grad_(True) for k, v in student.items() if v.is_floating_point()}
    inputs = {**{k: v.to(device) for k, v in student.items()}, **leaves}
    if autocast is not None:
        inputs.update({k: leaves[k].to(autocast) for k in FEATURES})
    on_device = {k: v.to(device) for k, v in teacher.items()}
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        value = module(inputs, on_device)[f"{name}_loss"].float()
    wrt = [leaves[k] for k in (*FEATURES, *SCALES)] + list(module.parameters())
    grads = torch.autograd.grad(value, wrt, allow_unused=True)
    return [t.detach().float().cpu() if t is not None else None for t in (value, *grads)]


def relative_error(got: list, want: list) -> float:
    """The largest |got - want| over the largest |want|, over the value and every gradient; inf
    where one side has a gradient the other lacks (or a non-finite number)."""
    worst = 0.0
    for a, b in zip(got, want):
        if a is None or b is None:
            if a is not b:
                return float("inf")
            continue
        scale = max(float(b.abs().max()), 1e-12)
        err = float((a - b).abs().max()) / scale
        worst = max(worst, err if err == err else float("inf"))
    return worst


def run_losses(cfg) -> dict[str, Any]:
    """The losses section: per loss, the relative error of fp32 and of each autocast dtype on this
    machine's device against CPU fp32, and a check per mode against its tolerance."""
    use_cuda = torch.cuda.is_available() and not cfg.dry_run
    device = torch.device("cuda" if use_cuda else "cpu")
    autocasts = [torch.float16, torch.bfloat16] if use_cuda else [torch.bfloat16]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 (no TF32) for the tight comparison
    try:
        ds, dt = cfg.loss_dims
        student, teacher = loss_inputs(cfg.loss_batch, ds, dt, cfg.loss_classes, cfg.seed)
        losses = loss_set(ds, dt, cfg.loss_classes, cfg.seed)
        results, checks = {}, []
        for name, module in losses.losses.items():
            want = evaluate(module, name, student, teacher, torch.device("cpu"), None)
            row = {"value_cpu_fp32": float(want[0]),
                   "fp32": relative_error(evaluate(module, name, student, teacher, device, None), want)}
            tolerances = {"fp32": cfg.fp32_tol}
            for dtype in autocasts:
                mode = f"autocast_{str(dtype).removeprefix('torch.')}"
                row[mode] = relative_error(evaluate(module, name, student, teacher, device, dtype), want)
                tolerances[mode] = cfg.autocast_tol[str(dtype).removeprefix("torch.")]
            results[name] = row
            checks += [{"name": f"{name} {mode} on {device.type} vs CPU fp32", "value": row[mode],
                        "target": f"<= {tol:g}", "passed": row[mode] <= tol} for mode, tol in tolerances.items()]
    finally:
        torch.set_float32_matmul_precision(previous)
    return {"device": str(device), "batch": cfg.loss_batch, "dims": list(cfg.loss_dims),
            "error": "max |device - cpu fp32| / max |cpu fp32| over the value and every gradient",
            "losses": results, "checks": checks}
