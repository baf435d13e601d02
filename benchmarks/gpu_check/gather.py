"""The DDP collectives of `student_trainer.distributed` on two ranks: NCCL on two GPUs against gloo
on CPU, and both against the values one process computes for the global batch.

Each rank holds its own rows; the check runs `all_gather_no_grad`, `all_gather_with_grad` with a
backward through it (each rank's gradient is the sum over ranks of the gathered gradient's
slice for its rows), `average_gradients` and `sum_over_ranks`. Inputs are small integers and
halves, so every result is exact in fp32 and any difference is a real one. With fewer than two
GPUs the NCCL run is skipped with a message; the dry run runs the gloo ranks alone.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

WORLD, ROWS, DIM = 2, 3, 4


def rank_inputs(rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s rows, the weights of its gathered loss, its parameter gradient (exact in fp32)."""
    base = torch.arange(ROWS * DIM, dtype=torch.float32).reshape(ROWS, DIM)
    weights = torch.arange(WORLD * ROWS * DIM, dtype=torch.float32).reshape(WORLD * ROWS, DIM) % 7 - 3
    return {"rows": base + 100 * rank, "weights": weights * (rank + 1),
            "grad": torch.full((DIM,), 0.5 * (rank + 1)), "counts": torch.tensor([rank + 1, 10 * (rank + 1)])}


def expected() -> list[dict[str, torch.Tensor]]:
    """What every rank must get, computed in one process for the global batch."""
    inputs = [rank_inputs(r) for r in range(WORLD)]
    gathered = torch.cat([i["rows"] for i in inputs])
    summed_weights = sum(i["weights"] for i in inputs)  # every rank's loss reaches every rank's rows
    average = sum(i["grad"] for i in inputs) / WORLD
    counts = sum(i["counts"] for i in inputs)
    return [{"no_grad": gathered, "with_grad": gathered, "rows_grad": summed_weights[r * ROWS:(r + 1) * ROWS],
             "average": average, "counts": counts} for r in range(WORLD)]


def rank_results(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The collectives on this rank (a process group must be initialised), results on CPU."""
    from student_trainer.distributed import (all_gather_no_grad, all_gather_with_grad, average_gradients,
                                             sum_over_ranks)

    x = {k: v.to(device) for k, v in rank_inputs(rank).items()}
    rows = x["rows"].clone().requires_grad_(True)
    with_grad = all_gather_with_grad(rows)
    (with_grad * x["weights"]).sum().backward()
    param = torch.nn.Parameter(torch.zeros(DIM, device=device))
    param.grad = x["grad"].clone()
    average_gradients([param])
    counts = sum_over_ranks({"a": int(x["counts"][0]), "b": int(x["counts"][1])}, device)
    out = {"no_grad": all_gather_no_grad(x["rows"]), "with_grad": with_grad.detach(), "rows_grad": rows.grad,
           "average": param.grad, "counts": torch.tensor([counts["a"], counts["b"]])}
    return {k: v.detach().cpu() for k, v in out.items()}


def _rank_main(rank: int, backend: str, port: int, out_dir: str) -> None:
    """torch.multiprocessing.spawn's entry: join the group, run the collectives, save the results."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    try:
        torch.save(rank_results(rank, device), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(backend: str) -> list[dict[str, torch.Tensor]]:
    """Two ranks of `backend` in their own processes; each rank's results."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="kd-gpu-check-gather-") as tmp:
        mp.spawn(_rank_main, args=(backend, port, tmp), nprocs=WORLD, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def differences(got: list[dict], want: list[dict]) -> list[str]:
    """'rank r: key' for every result that is not exactly the expected one."""
    return [f"rank {r}: {k}" for r in range(WORLD) for k in want[r]
            if not torch.equal(got[r][k].to(want[r][k].dtype), want[r][k])]


def run_gather(cfg) -> dict[str, Any]:
    """The gather section: gloo always (dry run: alone), NCCL where two GPUs are present."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not cfg.dry_run and gpus < 2:
        return {"skipped": f"{gpus} GPU(s) on this machine: the 2-rank NCCL gather check needs 2"}
    backends = ["gloo"] if cfg.dry_run else ["gloo", "nccl"]
    want = expected()
    results = {backend: spawn_ranks(backend) for backend in backends}
    checks = [{"name": f"{backend}: gathers, gradient sums, averages and counts equal the one-process values",
               "value": len(differences(got, want)), "target": "== 0 differences",
               "passed": not differences(got, want), "detail": differences(got, want)}
              for backend, got in results.items()]
    if "nccl" in results:
        diff = differences(results["nccl"], results["gloo"])
        checks.append({"name": "nccl (GPU) equals gloo (CPU)", "value": len(diff), "target": "== 0 differences",
                       "passed": not diff, "detail": diff})
    return {"backends": backends, "world_size": WORLD, "gpus": gpus,
            "collectives": ["all_gather_no_grad", "all_gather_with_grad (+ backward)", "average_gradients",
                            "sum_over_ranks"], "checks": checks}
