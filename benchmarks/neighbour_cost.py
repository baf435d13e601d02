"""What a busy neighbouring core costs a pinned student step on this machine (issue 16).

In `kd bench`'s remote mode the student trains on core 0 while the teacher computes on core 1;
in `none` and `cache` modes core 1 is idle. The remote student's compute part grew beyond what
its extra losses cost (the `cache` mode trains the same losses), and its own CPU time per step
grew with it. This script measures that effect alone, without Ray: the bench's student (`--preset`
models) takes training steps pinned to one core with one torch thread, while the other core is

  idle     nothing of ours runs there,
  teacher  the bench's teacher runs forward passes (what the pool does in remote mode),
  spin     a Python loop that touches almost no memory (keeps the core busy, shares no cache),

conditions interleaved over repeats. Reported per condition: the student's CPU ms per step
(`time.thread_time`: the same work, so any growth is the hardware slowing it: shared caches,
memory bandwidth, or on a VM two vCPUs that share one physical core) and wall ms per step,
median and min..max over repeats, and the ratio to `idle`. On separate machines none of this
would reach the student.

    python benchmarks/neighbour_cost.py --repeats 5 --steps 8 --out benchmarks/results/neighbour_cost.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

CONDITIONS = ("idle", "teacher", "spin")


def _models(preset_name: str):
    from benchmarks.suite.config import preset

    return preset(preset_name).models


def _build(name: str, overrides: dict):
    import open_clip

    from student_trainer.config import ModelConfig
    from student_trainer.factory import resolve_model

    arch, kwargs = resolve_model(ModelConfig(name=name, overrides=dict(overrides)))
    return open_clip.create_model(arch, pretrained=None, output_dict=True, **kwargs)


def _inputs(model, batch: int, image_size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, 1000, (batch, int(model.context_length)), generator=g)
    return images, tokens


def _neighbour(kind: str, core: int, preset_name: str, batch: int, ready, stop) -> None:
    """Runs on `core` until `stop` is set: the teacher's forward passes, or a spin loop."""
    os.sched_setaffinity(0, {core})
    if kind == "teacher":
        import torch

        torch.set_num_threads(1)
        m = _models(preset_name)
        model = _build(m.teacher, m.teacher_overrides).eval()
        images, tokens = _inputs(model, batch, m.image_size)
        with torch.no_grad():
            model(images, tokens)
            ready.set()
            while not stop.is_set():
                model(images, tokens)
    else:
        ready.set()
        x = 0
        while not stop.is_set():
            for i in range(10_000):
                x = (x + i) & 0xFFFF


def _student_steps(model, optimizer, loss_fn, images, tokens, steps: int) -> tuple[float, float]:
    """(CPU ms per step of this thread, wall ms per step) over `steps` training steps."""
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(steps):
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.thread_time() - cpu0) * 1e3 / steps, (time.perf_counter() - wall0) * 1e3 / steps


def measure(preset_name: str, repeats: int, steps: int, batch: int, student_core: int, other_core: int) -> dict:
    import torch
    from open_clip.loss import ClipLoss

    os.sched_setaffinity(0, {student_core})
    torch.set_num_threads(1)
    m = _models(preset_name)
    model = _build(m.student, m.student_overrides).train()
    images, tokens = _inputs(model, batch, m.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ClipLoss()
    _student_steps(model, optimizer, loss_fn, images, tokens, 2)  # warm-up
    ctx = mp.get_context("spawn")
    results: dict[str, dict[str, list[float]]] = {c: {"cpu_ms": [], "wall_ms": []} for c in CONDITIONS}
    for rep in range(repeats):
        for cond in CONDITIONS:
            proc, stop = None, ctx.Event()
            if cond != "idle":
                ready = ctx.Event()
                proc = ctx.Process(target=_neighbour, args=(cond, other_core, preset_name, batch, ready, stop))
                proc.start()
                ready.wait(300)
                time.sleep(1.0)  # the neighbour in its steady loop
            cpu, wall = _student_steps(model, optimizer, loss_fn, images, tokens, steps)
            if proc is not None:
                stop.set()
                proc.join(60)
            results[cond]["cpu_ms"].append(cpu)
            results[cond]["wall_ms"].append(wall)
            print(f"repeat {rep + 1}/{repeats} {cond:8s} CPU {cpu:7.1f} ms/step, wall {wall:7.1f} ms/step", flush=True)
    return results


def summarise(results: dict) -> dict:
    out = {}
    for cond, series in results.items():
        row = {}
        for key, values in series.items():
            base = results["idle"][key]
            ratios = [v / b for v, b in zip(values, base)]  # per repeat: same repeat's idle run
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                        "ratio_to_idle_median": statistics.median(ratios), "ratio_min": min(ratios),
                        "ratio_max": max(ratios), "values": values}
        out[cond] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="kd bench preset whose teacher and student are used")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="student steps per measurement")
    p.add_argument("--batch-size", type=int, default=16, help="the cpu preset's students batch")
    p.add_argument("--student-core", type=int, default=None, help="default: the first available core")
    p.add_argument("--other-core", type=int, default=None, help="default: the last available core")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        p.error(f"needs two cores, this process has {cores}")
    student = cores[0] if args.student_core is None else args.student_core
    other = cores[-1] if args.other_core is None else args.other_core
    from benchmarks.suite.records import machine_info
    from teacher_service.atomic_files import write_atomic

    machine = machine_info({"student": 1, "teacher": 1})
    started = time.time()
    results = measure(args.preset, args.repeats, args.steps, args.batch_size, student, other)
    summary = summarise(results)
    for cond, row in summary.items():
        print(f"{cond:8s} CPU ms/step {row['cpu_ms']['median']:7.1f} (x{row['cpu_ms']['ratio_to_idle_median']:.3f}, "
              f"{row['cpu_ms']['ratio_min']:.3f}..{row['cpu_ms']['ratio_max']:.3f})  wall ms/step "
              f"{row['wall_ms']['median']:7.1f} (x{row['wall_ms']['ratio_to_idle_median']:.3f})")
    if args.out:
        doc = {"command": "python benchmarks/neighbour_cost.py " + " ".join(os.sys.argv[1:]),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
               "wall_s": time.time() - started, "machine": machine["summary"],
               "load_average_start_end": [machine["load_average"][0], list(os.getloadavg())],
               "student_core": student, "other_core": other, "preset": args.preset, "steps": args.steps,
               "batch_size": args.batch_size, "repeats": args.repeats, "conditions": summary}
        write_atomic(Path(args.out), json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
