"""Soak: several in-cluster students and a gRPC client hammering one teacher app, bounded in time.

What it runs, on the connected Ray cluster (loopback only: the gRPC ingress binds 127.0.0.1):
- `students` Ray actors, each a `RemoteTeacher` (the student's own teacher client: prefetch
  window, retries, fingerprint check) streaming synthetic batches and sleeping `step_s` per batch
  as if it trained on it; each records how long every step waited for the teacher;
- `grpc_clients` threads in this process calling Embed over gRPC in a closed loop under one
  caller name; with the teacher's `grpc.caller_max_in_flight` below their number some calls are refused
  RESOURCE_EXHAUSTED by design (counted as refusals, then retried after `refusal_backoff_s`);
- every `sample_s`, the resident memory of each replica and of the ingress.
The report: requests served and errors per client kind, p50/p99 latency (students: wait per step;
gRPC: call latency), refusals by reason, and memory after the warm-up and at the end.

Used by tests/test_soak.py (a short soak); as a script it runs one for as long as you like:

    python benchmarks/soak.py --duration 600 --json benchmarks/results/soak.json
    python benchmarks/soak.py --duration 3600 --address auto --students 8 --grpc-clients 16

which prints requests served, errors, p50/p99 latency and the memory of every replica and of the
gRPC ingress after the warm-up, every --sample-s seconds, and at the end, and exits 1 when any
request failed unexpectedly or a process grew more than --max-growth-mib.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from cluster.local import init_ray
from student_trainer.config import ModelConfig
from student_trainer.factory import resolve_model
from teacher_service.atomic_files import write_atomic
from teacher_service.config import ServingConfig, TeacherConfig
from teacher_service.stats import percentile

MIB = 2**20


@dataclass(frozen=True)
class SoakConfig:
    """Load shape. Duration includes `warmup_s`, after which the starting memory is taken."""

    duration_s: float = 20.0
    warmup_s: float = 4.0
    students: int = 3
    student_batch: int = 16
    step_s: float = 0.02
    grpc_clients: int = 6
    grpc_batch: int = 8
    refusal_backoff_s: float = 0.01
    image_size: int = 32
    context_length: int = 16
    sample_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.duration_s > self.warmup_s >= 0:
            raise ValueError(f"duration_s={self.duration_s} must exceed warmup_s={self.warmup_s} >= 0")
        for name in ("students", "grpc_clients", "student_batch", "grpc_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")


@dataclass
class ClientTally:
    """One kind of client's outcome: answered requests, unexpected errors, refusals, latencies (s)."""

    served: int = 0
    samples: int = 0
    errors: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, other: ClientTally) -> None:
        self.served += other.served
        self.samples += other.samples
        self.errors += other.errors
        for reason, n in other.refused.items():
            self.refused[reason] = self.refused.get(reason, 0) + n
        self.latencies += other.latencies

    def summary(self) -> dict[str, Any]:
        p50, p99 = percentile(self.latencies, 50), percentile(self.latencies, 99)
        return {"served": self.served, "samples": self.samples, "errors": len(self.errors),
                "error_examples": self.errors[:3], "refused": dict(self.refused),
                "latency_p50_ms": None if p50 is None else round(1000 * p50, 1),
                "latency_p99_ms": None if p99 is None else round(1000 * p99, 1),
                "latency_max_ms": round(1000 * max(self.latencies), 1) if self.latencies else None}


def synthetic_arrays(n: int, seed: int, image_size: int, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, S, S, 3] and valid token rows [n, L] (SOT, two ids, EOT, zero padding)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, context_length), np.int64)
    tokens[:, 0], tokens[:, 1:3], tokens[:, 3] = 49406, rng.integers(1, 49000, (n, 2)), 49407
    return rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8), tokens


# ============================================================================================ students
@ray.remote(num_cpus=0)
class StudentLoad:
    """A student's teacher traffic: `RemoteTeacher.stream` over synthetic batches, a sleep per step."""

    def __init__(self, app_name: str, run: str, cfg: dict):
        from student_trainer.config import TeacherSourceConfig
        from student_trainer.teacher.sources import RemoteTeacher

        self.cfg = SoakConfig(**cfg)
        self.run_name = run
        self.teacher = RemoteTeacher(TeacherSourceConfig(mode="remote", app_name=app_name, timeout_s=60.0,
                                                         retries=0, coalesce=False), run=run)

    def ready(self) -> bool:
        return True

    def run(self, until: float) -> ClientTally:
        """Stream until the wall-clock time `until`; a failed stream is an error and a new stream starts."""
        tally = ClientTally()
        while time.time() < until:
            try:
                self._stream(until, tally)
            except Exception as e:  # noqa: BLE001 - the soak reports every error
                tally.errors.append(f"{type(e).__name__}: {e}"[:300])
        return tally

    def _stream(self, until: float, tally: ClientTally) -> None:
        stream = self.teacher.stream(self._batches(until))
        while True:
            started = time.perf_counter()
            item = next(stream, None)
            if item is None:
                return
            tally.latencies.append(time.perf_counter() - started)
            tally.served += 1
            tally.samples += len(item[0])
            time.sleep(self.cfg.step_s)  # "training" on the batch

    def _batches(self, until: float):
        from student_trainer.data.batches import Batch

        c = self.cfg
        images, tokens = synthetic_arrays(4 * c.student_batch, abs(hash(self.run_name)) % 2**31, c.image_size,
                                          c.context_length)
        step = 0
        while time.time() < until:
            rows = np.arange(step * c.student_batch, (step + 1) * c.student_batch) % len(images)
            yield Batch(keys=[f"{self.run_name}-{step}-{i}" for i in range(c.student_batch)], images=images[rows],
                        tokens=tokens[rows], labels=np.full(c.student_batch, -1, np.int64),
                        captions=[""] * c.student_batch)
            step += 1


# ================================================================================================ gRPC
class GrpcHammer:
    """`clients` threads, each a closed loop of Embed calls through one TeacherGrpcClient (one caller)."""

    def __init__(self, target: str, app_name: str, caller: str, cfg: SoakConfig):
        from teacher_service.grpc.client import TeacherGrpcClient

        self.cfg = cfg
        self.client = TeacherGrpcClient(target, app_name, caller=caller)
        self.stop = threading.Event()
        self.tallies = [ClientTally() for _ in range(cfg.grpc_clients)]
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(cfg.grpc_clients)]

    def start(self) -> None:
        self.client.wait_ready(timeout_s=60)
        for t in self.threads:
            t.start()

    def finish(self) -> ClientTally:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        self.client.close()
        total = ClientTally()
        for tally in self.tallies:
            total.add(tally)
        return total

    def _loop(self, i: int) -> None:
        from teacher_service.grpc.caller_limits import CallerLimitError

        c, tally = self.cfg, self.tallies[i]
        images, tokens = synthetic_arrays(c.grpc_batch, 1000 + i, c.image_size, c.context_length)
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                self.client.embed(images, tokens)
            except CallerLimitError as e:
                tally.refused[e.reason] = tally.refused.get(e.reason, 0) + 1
                time.sleep(c.refusal_backoff_s)
                continue
            except Exception as e:  # noqa: BLE001 - the soak reports every error
                tally.errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            tally.latencies.append(time.perf_counter() - started)
            tally.served += 1
            tally.samples += c.grpc_batch


# ============================================================================================== memory
def pool_memory(handle) -> dict[str, int]:
    """Resident bytes of each replica and of the gRPC ingress (`collect_stats`)."""
    from teacher_service.app import collect_stats

    stats = collect_stats(handle)
    memory = {f"replica {rid}": int(r.get("rss_bytes") or 0) for rid, r in stats["replicas"].items()}
    if stats.get("grpc_ingress"):
        memory["grpc ingress"] = int(stats["grpc_ingress"].get("rss_bytes") or 0)
    return memory


class MemorySampler(threading.Thread):
    """Polls `pool_memory` every `every_s` until stopped: the trajectory, not only two points."""

    def __init__(self, handle, every_s: float):
        super().__init__(daemon=True)
        self.handle, self.every_s = handle, every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stop = threading.Event()
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.samples.append((time.monotonic() - self.started, pool_memory(self.handle)))


# ================================================================================================ soak
def run_soak(teacher: TeacherConfig, cfg: SoakConfig, log=print) -> dict[str, Any]:
    """Deploy `teacher` (gRPC on a free loopback port), run the load for `cfg.duration_s`, delete it.

    Returns the report (see the module docstring). Ray must be connected.
    """
    from teacher_service.app import collect_stats, delete_teacher, deploy, get_teacher_handle
    from teacher_service.grpc.ingress import ingress_address

    teacher = teacher.updated({"grpc.host": "127.0.0.1", "grpc.port": 0})
    app = teacher.serving.app_name
    deploy(teacher)
    try:
        handle = get_teacher_handle(app, timeout_s=300)
        target = ingress_address(app)
        students = [StudentLoad.remote(app, f"soak-student-{i}", dataclasses.asdict(cfg))
                    for i in range(cfg.students)]
        ray.get([s.ready.remote() for s in students], timeout=300)
        hammer = GrpcHammer(target, app, "soak-hammer", cfg)
        log(f"soak: {cfg.students} students + {cfg.grpc_clients} gRPC threads on {target} for {cfg.duration_s:.0f} s")
        began = time.time()
        runs = [s.run.remote(began + cfg.duration_s) for s in students]
        hammer.start()
        time.sleep(cfg.warmup_s)
        memory_start = pool_memory(handle)
        sampler = MemorySampler(handle, cfg.sample_s)
        sampler.start()
        student_tallies = ray.get(runs, timeout=cfg.duration_s + 300)
        grpc_tally = hammer.finish()
        sampler.stop.set()
        sampler.join(timeout=60)
        elapsed = time.time() - began
        memory_end = pool_memory(handle)
        stats = collect_stats(handle)
        for s in students:
            ray.kill(s)
    finally:
        delete_teacher(app)
    students_total = ClientTally()
    for tally in student_tallies:
        students_total.add(tally)
    return {"duration_s": round(elapsed, 1), "config": dataclasses.asdict(cfg), "target": target,
            "students": students_total.summary(), "grpc": grpc_tally.summary(),
            "teacher": {k: stats.get(k) for k in ("requests", "samples", "errors", "errors_in_flight_limit",
                                                   "errors_rate_limited", "batches", "batch_fill_mean",
                                                   "queue_wait_p99_s")},
            "memory_start_mib": _mib(memory_start), "memory_end_mib": _mib(memory_end),
            "memory_trajectory_mib": [(round(t, 1), _mib(m)) for t, m in sampler.samples]}


def memory_growth_mib(report: dict[str, Any]) -> dict[str, float]:
    """End minus start, per process (MiB)."""
    start, end = report["memory_start_mib"], report["memory_end_mib"]
    return {name: round(end[name] - start[name], 1) for name in start if name in end}


def format_report(report: dict[str, Any]) -> str:
    s, g = report["students"], report["grpc"]
    lines = [
        f"soak {report['duration_s']} s on {report['target']}",
        (f"students  served {s['served']} requests ({s['samples']} samples), errors {s['errors']}, "
         f"wait per step p50 {s['latency_p50_ms']} ms, p99 {s['latency_p99_ms']} ms, max {s['latency_max_ms']} ms"),
        (f"gRPC      served {g['served']} requests ({g['samples']} samples), errors {g['errors']}, refused "
         f"{g['refused'] or 0}, latency p50 {g['latency_p50_ms']} ms, p99 {g['latency_p99_ms']} ms, "
         f"max {g['latency_max_ms']} ms"),
        f"teacher   {report['teacher']}",
        (f"memory    start {report['memory_start_mib']} MiB, end {report['memory_end_mib']} MiB, "
         f"growth {memory_growth_mib(report)} MiB"),
    ]
    if s["error_examples"] or g["error_examples"]:
        lines.append(f"errors    {s['error_examples'] + g['error_examples']}")
    return "\n".join(lines)


def _mib(memory: dict[str, int]) -> dict[str, float]:
    return {name: round(b / MIB, 1) for name, b in memory.items()}


# ============================================================================================= script
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
        write_atomic(args.json, json.dumps(report, indent=2))
    growth = memory_growth_mib(report)
    failed = report["students"]["errors"] or report["grpc"]["errors"] or any(
        g > args.max_growth_mib for g in growth.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
