"""Student throughput by teacher mode: none, inline (OpenCLIP-style) and remote (Serve pool).

The same student, data and batch size in one run; prints samples/s per mode, the ratio to
no-teacher, the student worker's peak RSS and the time it spent waiting for the teacher.

On a CPU machine the student worker and the teacher replica each run one torch thread, so on a
2-core machine they occupy separate cores, mirroring separate student and teacher machines.

    python benchmarks/student_throughput.py --steps 40 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from cluster.local import init_ray
from student_trainer.config import DataConfig, ModelConfig, TeacherSourceConfig, TrainConfig
from student_trainer.datasets import write_digits_shards
from student_trainer.factory import resolve_model
from student_trainer.train import run_training
from teacher_service.config import TeacherConfig
from teacher_service.deployment import deploy

MODES = ("none", "inline", "remote")


def teacher_config(args: argparse.Namespace) -> TeacherConfig:
    arch, overrides = resolve_model(ModelConfig(name=args.teacher))
    return TeacherConfig(model=arch, overrides=overrides, app_name="kd-bench-teacher",
                         num_cpus=1.0, torch_threads=1, max_batch_size=4 * args.batch_size)


def run_mode(mode: str, args: argparse.Namespace, data_dir: Path, storage: Path, rep: int) -> dict:
    tcfg = teacher_config(args)
    losses = {"clip": 1.0} if mode == "none" else {"clip": 1.0, "kl": 1.0, "fd": 2000.0}
    cfg = TrainConfig(
        run_name=f"bench-{mode}-{rep}-{int(time.time())}", storage_path=str(storage),
        model=ModelConfig(name=args.student),
        data=DataConfig(train_shards=str(data_dir / "train-*.tar"), batch_size=args.batch_size),
        teacher=TeacherSourceConfig(mode=mode, app_name=tcfg.app_name,
                                    teacher=tcfg if mode == "inline" else None,
                                    prefetch=args.prefetch),
        losses=losses, epochs=1, max_steps_per_epoch=args.steps, num_workers=args.workers,
        log_every_steps=0, torch_threads=1,
    )
    metrics = run_training(cfg).metrics
    return {"samples_per_s": metrics["train_samples_per_s"], "peak_rss_mb": metrics["peak_rss_mb"],
            "teacher_wait_s": metrics.get("teacher_wait_s", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="digits-student")
    parser.add_argument("--teacher", default="digits-teacher")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    parser.add_argument("--workers", type=int, default=1, help="student DDP workers")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; medians reported")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    print(init_ray(num_cpus=4))
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        write_digits_shards(data_dir, image_size=32, samples_per_shard=200)
        deploy(teacher_config(args)).info.remote().result(timeout_s=300)
        for rep in range(args.repeats):
            for mode in MODES:  # interleaved so drift hits every mode alike
                results[mode].append(run_mode(mode, args, data_dir, Path(tmp) / "runs", rep))
                print(mode, rep, results[mode][-1], flush=True)

    base = statistics.median(r["samples_per_s"] for r in results["none"])
    summary = {}
    print(f"\n{'mode':8} {'samples/s':>10} {'min..max':>15} {'ratio':>6} {'peak RSS MB':>12} {'wait s':>7}")
    for mode in MODES:
        sps = [r["samples_per_s"] for r in results[mode]]
        med = statistics.median(sps)
        summary[mode] = {"samples_per_s_median": med, "samples_per_s_min": min(sps),
                         "samples_per_s_max": max(sps), "ratio_to_none": med / base,
                         "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in results[mode]),
                         "teacher_wait_s_median": statistics.median(r["teacher_wait_s"] for r in results[mode]),
                         "runs": results[mode]}
        s = summary[mode]
        print(f"{mode:8} {med:10.1f} {min(sps):7.1f}..{max(sps):<7.1f} {s['ratio_to_none']:6.2f} "
              f"{s['peak_rss_mb_median']:12.0f} {s['teacher_wait_s_median']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "modes": summary}, indent=2))


if __name__ == "__main__":
    main()
