"""Several student runs on one teacher pool: per-run and total samples/s, teacher utilisation and
the fraction of samples answered without a forward of their own (coalesced or from the replica's
recent rows), for 1, 2, 4 concurrent runs.

Every run is its own `kd train` process (`cluster.sweep.run_sweep`, as separate Ray jobs would
be), in remote mode against one teacher app. Two data layouts:
- `shared`: every run trains on the same data, seed and views (a sweep of loss weights), so the
  pool can compute each (key, view) once for all of them;
- `distinct`: every run has its own seed, so its views differ and nothing can be shared.

Figures come from the teacher's own counters, polled while the runs train: the window in which
every run was being answered (processes start a few seconds apart), per-run answered samples/s
in it (remote mode: one request per student step, so this is the student's step rate), total
samples/s, teacher utilisation (forward seconds / window seconds, one replica) and the reused
fraction. On a CPU machine every process competes for the same cores, so the figures say how the
pool shares itself, not what separate GPU machines would reach.

    python benchmarks/multi_student.py --runs 1 2 4 --layouts shared distinct --epochs 3
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import ray

from cluster.local import init_ray
from cluster.sweep import run_sweep
from student_trainer.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TeacherSourceConfig,
    TrainConfig,
)
from student_trainer.datasets import write_digits_shards
from student_trainer.factory import resolve_model
from teacher_service.config import TeacherConfig
from teacher_service.deployment import collect_stats, deploy

APP = "kd-bench-multi"
IMAGE_SIZE = 32


class Poller(threading.Thread):
    """Teacher stats every `period_s` seconds: [(monotonic time, merged stats)]."""

    def __init__(self, handle, period_s: float = 0.5):
        super().__init__(daemon=True)
        self.handle, self.period_s = handle, period_s
        self.samples: list[tuple[float, dict]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), collect_stats(self.handle)))
            except Exception as e:  # noqa: BLE001 - a missed poll only coarsens the window
                print(f"stats poll failed: {e}")
            self.stop.wait(self.period_s)


def run_counter(stats: dict, run: str, key: str = "samples") -> float:
    return stats["runs"].get(run, {}).get(key, 0)


def common_window(polls: list[tuple[float, dict]], runs: list[str]) -> tuple[int, int] | None:
    """Indices (a, b) of the polls bounding the time every run was being answered."""
    starts, ends = [], []
    for run in runs:
        values = [run_counter(s, run) for _, s in polls]
        final = values[-1]
        first = next((i for i, v in enumerate(values) if v > 0), None)
        last = next((i for i, v in enumerate(values) if v >= final), None)
        if first is None or last is None:
            return None
        starts.append(first)
        ends.append(last)
    a, b = max(starts), min(ends)
    return (a, b) if b > a else None


def measure(polls: list[tuple[float, dict]], runs: list[str]) -> dict:
    window = common_window(polls, runs)
    if window is None:
        return {"error": "the runs never trained at the same time"}
    (t0, s0), (t1, s1) = polls[window[0]], polls[window[1]]
    span = t1 - t0
    per_run = {r: (run_counter(s1, r) - run_counter(s0, r)) / span for r in runs}
    requested = s1["samples_requested"] - s0["samples_requested"]
    reused = (s1["samples_coalesced"] - s0["samples_coalesced"]) + (s1["samples_from_cache"] - s0["samples_from_cache"])
    return {"window_s": round(span, 2), "per_run_samples_per_s": {r: round(v, 1) for r, v in per_run.items()},
            "total_samples_per_s": round(sum(per_run.values()), 1),
            "teacher_computed_per_s": round((s1["samples_computed"] - s0["samples_computed"]) / span, 1),
            "teacher_utilisation": round((s1["forward_s"] - s0["forward_s"]) / span, 3),
            "reused_fraction": round(reused / requested, 3) if requested else None,
            "coalesced_in_flight": int(s1["samples_coalesced"] - s0["samples_coalesced"]),
            "from_recent_rows": int(s1["samples_from_cache"] - s0["samples_from_cache"]),
            "batch_fill_mean": round((s1["batch_fill_sum"] - s0["batch_fill_sum"])
                                     / max(1, s1["batches"] - s0["batches"]), 3)}


def run_configs(args, n: int, layout: str, data: Path, work: Path, case: int) -> list[TrainConfig]:
    """Seeds are new for every case (the replica's recent rows must not carry over between cases):
    one seed for all runs of a `shared` case, one per run in a `distinct` case."""
    stamp = int(time.time())
    configs = []
    for i in range(n):
        configs.append(TrainConfig(
            run_name=f"{layout}-{n}-{i}-{stamp}", storage_path=str(work / "runs"),
            model=ModelConfig(name=args.student),
            data=DataConfig(train_shards=str(data / "train-*.tar"), batch_size=args.batch_size, image_size=IMAGE_SIZE),
            teacher=TeacherSourceConfig(mode="remote", app_name=APP, prefetch=args.prefetch, timeout_s=300),
            losses={"clip": 1.0, "kl": 1.0 + i}, optim=OptimConfig(warmup_steps=5), epochs=args.epochs,
            max_steps_per_epoch=args.steps, num_workers=1, cpus_per_worker=1, torch_threads=1, log_every_steps=0,
            seed=1000 * case + (0 if layout == "shared" else 1 + i)))
    return configs


def one_case(args, handle, n: int, layout: str, data: Path, work: Path, case: int) -> dict:
    configs = run_configs(args, n, layout, data, work, case)
    paths = []
    for cfg in configs:
        path = work / f"{cfg.run_name}.yaml"
        cfg.to_yaml(path)
        paths.append(str(path))
    poller = Poller(handle)
    poller.start()
    started = time.perf_counter()
    outcomes = run_sweep(paths, ray.get_runtime_context().gcs_address)
    wall = time.perf_counter() - started
    poller.stop.set()
    poller.join()
    result = {"runs": n, "layout": layout, "wall_s": round(wall, 1),
              "exit_codes": [o.returncode for o in outcomes],
              "student_train_samples_per_s": [(o.metrics or {}).get("train_samples_per_s") for o in outcomes],
              **measure(poller.samples, [c.run_name for c in configs])}
    print(json.dumps(result), flush=True)
    return result


def markdown(results: list[dict], meta: dict) -> str:
    head = (f"Teacher `{meta['teacher']}` (1 replica, 1 torch thread), students `{meta['student']}` "
            f"(1 worker each, 1 torch thread), batch {meta['batch_size']}, {meta['epochs']} epochs of at most "
            f"{meta['steps']} steps per run, "
            f"prefetch {meta['prefetch']}; {meta['machine']}.")
    columns = ("| layout | runs | per-run samples/s (each) | total samples/s | teacher computed/s | teacher busy "
               "| reused (coalesced + recent) | batch fill | common window s |")
    lines = [head, "", columns, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['runs']} | {r['error']} | | | | | | |")
            continue
        each = ", ".join(f"{v:.0f}" for v in r["per_run_samples_per_s"].values())
        lines.append(f"| {r['layout']} | {r['runs']} | {each} | {r['total_samples_per_s']:.0f} | "
                     f"{r['teacher_computed_per_s']:.0f} | {100 * r['teacher_utilisation']:.0f} % | "
                     f"{100 * (r['reused_fraction'] or 0):.0f} % ({r['coalesced_in_flight']} + {r['from_recent_rows']}) | "
                     f"{r['batch_fill_mean']:.2f} | {r['window_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layouts", nargs="+", default=["shared", "distinct"], choices=["shared", "distinct"])
    p.add_argument("--steps", type=int, default=150, help="steps per epoch at most (an epoch of the digits is 44)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--teacher", default="digits-teacher")
    p.add_argument("--student", default="digits-student")
    p.add_argument("--out", default="benchmarks/results/multi_student")
    args = p.parse_args()

    print(init_ray(num_cpus=max(8, 2 * max(args.runs) + 2)))
    work = Path(tempfile.mkdtemp(prefix="kd-bench-multi-"))
    data = work / "data"
    write_digits_shards(data, image_size=IMAGE_SIZE, samples_per_shard=200)
    arch, overrides = resolve_model(ModelConfig(name=args.teacher))
    tcfg = TeacherConfig(model=arch, overrides=overrides, app_name=APP, num_cpus=1.0, torch_threads=1,
                         max_batch_size=4 * args.batch_size, expected_request_samples=args.batch_size)
    handle = deploy(tcfg)
    handle.info.remote().result(timeout_s=300)
    cases = [(layout, n) for layout in args.layouts for n in args.runs]
    results = [one_case(args, handle, n, layout, data, work, case) for case, (layout, n) in enumerate(cases, 1)]
    meta = {"teacher": args.teacher, "student": args.student, "batch_size": args.batch_size, "steps": args.steps,
            "epochs": args.epochs,
            "prefetch": args.prefetch,
            "machine": f"{os.cpu_count()}-core CPU, no GPU, every process on the same cores"}
    table = markdown(results, meta)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    os.replace(tmp, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
