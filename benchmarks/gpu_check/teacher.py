"""The teacher's forward on the GPU, direct and served, at each batch size and precision.

Direct: `kd bench`'s `DirectForward` actor, holding the card alone, loads the teacher once and
times `TeacherEngine.embed_many` on prebuilt requests; between precisions `FrozenTeacher.precision`
is switched in the actor (it only picks the autocast dtype of the next forward). Served: the project's
Serve pool (`teacher_service.app.deploy`), one deploy per precision, timed through a handle with
`in_flight` requests outstanding (`kd bench`'s `served_rate`). The pool's `max_batch_size` is the
largest batch size and `batch_wait_timeout_s` 0, so a forward takes what is queued without
waiting for more: with two requests in flight that is one request, the direct forward's size;
each point records the mean forward size the pool's counters saw, so a point where requests were
merged says so.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import ray

from benchmarks.suite.common import BenchRun, teacher_config
from benchmarks.suite.pool import DirectForward, make_requests, served_rate

APP = "kd-gpu-check-pool"


def _set_precision(forward, precision: str) -> None:
    """Run in the direct actor (`__ray_call__`): the autocast dtype of its next forwards (the
    teacher stays fp32 wherever it is not on CUDA: `FrozenTeacher._autocast`)."""
    if forward.engine.teacher.device.type == "cuda":
        forward.engine.teacher.precision = precision


def _gpu_peak_mb(forward) -> float | None:
    """Run in the direct actor: its torch.cuda.max_memory_allocated in MB (None on CPU)."""
    from teacher_service.stats import gpu_peak_bytes

    peak = gpu_peak_bytes()
    return None if peak is None else peak / 2**20


def direct_rates(cfg, run: BenchRun) -> tuple[dict, dict]:
    """{(precision, batch): [samples/s per repeat]} of the direct forward, and the teacher's info."""
    base = teacher_config(run, APP, max_batch_size=max(cfg.batch_sizes), request_samples=min(cfg.batch_sizes))
    actor = DirectForward.options(num_cpus=base.serving.num_cpus,
                                  num_gpus=base.serving.num_gpus).remote(base.replica_dict())
    try:
        info = ray.get(actor.info.remote())
        rates: dict = {}
        for rep in range(cfg.repeats):
            for precision in cfg.precisions:
                ray.get(actor.__ray_call__.remote(_set_precision, precision))
                for b in cfg.batch_sizes:
                    run.log(f"teacher: direct forward, {precision}, batch {b}, repeat {rep + 1}/{cfg.repeats}")
                    rates.setdefault((precision, b), []).append(
                        ray.get(actor.rate.remote(b, cfg.requests, cfg.image_size, warmup=2)))
        info["direct_gpu_peak_mb"] = ray.get(actor.__ray_call__.remote(_gpu_peak_mb))
        return rates, info
    finally:
        ray.kill(actor)  # the card goes to the pool next


def served_rates(cfg, run: BenchRun, info: dict) -> tuple[dict, dict, dict]:
    """({(precision, batch): [samples/s]}, {(precision, batch): [mean forward samples]},
    {precision: the replica's GPU peak in MB}) through the Serve pool."""
    from ray import serve

    from teacher_service.app import collect_stats, deploy

    rates: dict = {}
    fills: dict = {}
    peaks: dict = {}
    base = teacher_config(run, APP, max_batch_size=max(cfg.batch_sizes), request_samples=min(cfg.batch_sizes))
    for precision in cfg.precisions:
        run.log(f"teacher: deploying the pool in {precision}")
        serving = dataclasses.replace(base.serving, batch_wait_timeout_s=0.0)
        handle = deploy(dataclasses.replace(base, precision=precision, serving=serving), access_log=False)
        handle.info.remote().result(timeout_s=600)
        for rep in range(cfg.repeats):
            for b in cfg.batch_sizes:
                requests = make_requests(cfg.requests + 2, b, cfg.image_size, info["context_length"],
                                         info.get("vocab_size") or 49408, f"served-{precision}-{b}-{rep}")
                before = collect_stats(handle)
                rates.setdefault((precision, b), []).append(served_rate(handle, requests, cfg.in_flight))
                after = collect_stats(handle)
                fills.setdefault((precision, b), []).append(
                    (after["samples_computed"] - before["samples_computed"]) / max(1, after["batches"] - before["batches"]))
        peak = collect_stats(handle).get("gpu_peak_bytes")
        peaks[precision] = None if peak is None else peak / 2**20
        serve.delete(APP)
    return rates, fills, peaks


def run_teacher(cfg, run: BenchRun) -> dict[str, Any]:
    """The teacher section: records per (precision, batch) and the served/direct check."""
    direct, info = direct_rates(cfg, run)
    served, fills, peaks = served_rates(cfg, run, info)
    points = []
    for (precision, b), values in direct.items():
        params = {"precision": precision, "batch_size": b, "in_flight": cfg.in_flight}
        ratio = [s / d for s, d in zip(served[(precision, b)], values)]
        run.add("teacher", f"direct forward ({precision}, batch {b})", "samples/s", values, params=params)
        run.add("teacher", f"served forward ({precision}, batch {b})", "samples/s", served[(precision, b)],
                params=params)
        run.add("teacher", f"served / direct ({precision}, batch {b})", "x", ratio, params=params, kind="derived",
                target=f">= {cfg.served_ratio_target}" if (precision, b) == ("fp16", max(cfg.batch_sizes)) else None)
        points.append({"precision": precision, "batch_size": b, "direct": statistics.median(values),
                       "served": statistics.median(served[(precision, b)]), "ratio": statistics.median(ratio),
                       "mean_forward_samples": statistics.mean(fills[(precision, b)])})
    checks = [{"name": f"served / direct, fp16, batch {p['batch_size']}", "value": p["ratio"],
               "target": f">= {cfg.served_ratio_target}", "passed": p["ratio"] >= cfg.served_ratio_target,
               "enforced": not cfg.dry_run}
              for p in points if p["precision"] == "fp16" and p["batch_size"] == max(cfg.batch_sizes)]
    checks += [{"name": "served forwards were the requests' size (no merged requests)",
                "value": max(abs(p["mean_forward_samples"] / p["batch_size"] - 1) for p in points),
                "target": "<= 0.1 (relative)", "enforced": False,
                "passed": all(abs(p["mean_forward_samples"] / p["batch_size"] - 1) <= 0.1 for p in points)}]
    return {"teacher": {k: info.get(k) for k in ("model", "embed_dim", "context_length", "device", "fingerprint")},
            "gpu_peak_mb": {"direct (all precisions)": info.get("direct_gpu_peak_mb"),
                            **{f"pool replica ({p})": v for p, v in peaks.items()}},
            "points": points, "checks": checks}
