"""Long soak of one teacher app: in-cluster students plus a gRPC client hammering the pool
(the code of tests/test_soak.py, `cluster.soak`, for as long as you like).

    python benchmarks/soak.py --duration 600 --json benchmarks/results/soak.json
    python benchmarks/soak.py --duration 3600 --address auto --students 8 --grpc-clients 16

Prints requests served, errors, p50/p99 latency and the memory of every replica and of the gRPC
ingress after the warm-up, every --sample-s seconds, and at the end. Exits 1 when any request
failed unexpectedly or a process grew more than --max-growth-mib. Loopback only: the ingress binds
127.0.0.1 on a free port.
"""
from __future__ import annotations

import argparse
import json
import sys

from cluster.local import init_ray
from cluster.soak import SoakConfig, format_report, memory_growth_mib, run_soak
from student_trainer.config import ModelConfig
from student_trainer.factory import resolve_model
from teacher_service.config import ServingConfig, TeacherConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load, warm-up included")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the starting memory is taken")
    p.add_argument("--students", type=int, default=3, help="student actors (RemoteTeacher clients)")
    p.add_argument("--grpc-clients", type=int, default=6, help="gRPC threads, one caller name")
    p.add_argument("--grpc-in-flight", type=int, default=4,
                   help="the caller's in-flight limit (below --grpc-clients: some calls are refused by design)")
    p.add_argument("--step-s", type=float, default=0.02, help="simulated training step per student batch")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--teacher", default="digits-teacher", help="model preset or open_clip architecture (random init)")
    p.add_argument("--teacher-config", help="TeacherConfig YAML instead of --teacher")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--max-growth-mib", type=float, default=32.0)
    p.add_argument("--address", help="Ray cluster address (default: an embedded local cluster)")
    p.add_argument("--json", help="also write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.teacher_config:
        base = TeacherConfig.from_yaml(args.teacher_config)
    else:
        arch, overrides = resolve_model(ModelConfig(name=args.teacher))
        base = TeacherConfig(model=arch, overrides=overrides, torch_threads=1,
                             serving=ServingConfig(num_cpus=0.5, max_batch_size=64, expected_request_samples=8))
    teacher = base.updated({"serving.app_name": "kd-teacher-soak", "serving.num_replicas": args.replicas,
                            "serving.autoscaling": None, "grpc.caller_max_in_flight": args.grpc_in_flight})
    soak = SoakConfig(duration_s=args.duration, warmup_s=args.warmup, students=args.students,
                      grpc_clients=args.grpc_clients, step_s=args.step_s, sample_s=args.sample_s)
    print(init_ray(args.address))
    report = run_soak(teacher, soak)
    print(format_report(report))
    for t, memory in report["memory_trajectory_mib"]:
        print(f"  t={t:7.1f} s  {memory}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    growth = memory_growth_mib(report)
    failed = report["students"]["errors"] or report["grpc"]["errors"] or any(
        g > args.max_growth_mib for g in growth.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
