"""Section 3: several student runs on one teacher pool (1, 2, 4 runs): per-run and total samples/s,
the fraction answered without a forward of their own (coalesced in flight or from the replica's
recent rows), and fairness between runs (Jain's index of per-run samples/s, 1 = equal shares).

Layouts: `shared` — every run has the same data, seed and views (a sweep of loss weights), so the
pool may compute each (key, view) once for all; `distinct` — every run has its own seed, nothing
can be shared. Runs are real `kd train` processes (`students="train"`, started as `kd sweep`
starts them) or request streams with no student compute (`"clients"`: how the pool shares itself).
Figures come from the teacher's own counters, polled over the window in which every run of the
case was being answered (processes start seconds apart).
"""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np
import ray

from teacher_service.app import collect_stats, deploy

from benchmarks.suite.common import BenchRun, teacher_config, train_config

SECTION = "multi"
APP = "kd-bench-multi"


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


def jain_index(rates: list[float]) -> float:
    """(Σx)² / (n·Σx²): 1 when every run gets the same, 1/n when one run gets everything."""
    total, squares = sum(rates), sum(r * r for r in rates)
    return total * total / (len(rates) * squares) if squares else 0.0


def measure(polls: list[tuple[float, dict]], runs: list[str]) -> dict:
    window = common_window(polls, runs)
    if window is None:
        return {"error": "the runs never trained at the same time"}
    (t0, s0), (t1, s1) = polls[window[0]], polls[window[1]]
    span = t1 - t0
    per_run = {r: (run_counter(s1, r) - run_counter(s0, r)) / span for r in runs}
    # answered and computed are both counted as the forwards finish: their ratio over one window is
    # consistent (samples_requested counts at acceptance, up to a prefetch window earlier)
    answered = sum(run_counter(s1, r) - run_counter(s0, r) for r in runs)
    computed = s1["samples_computed"] - s0["samples_computed"]
    return {"window_s": span, "per_run_samples_per_s": per_run, "total_samples_per_s": sum(per_run.values()),
            "teacher_computed_per_s": (s1["samples_computed"] - s0["samples_computed"]) / span,
            "teacher_utilisation": (s1["forward_s"] - s0["forward_s"]) / span,
            "reused_fraction": max(0.0, 1.0 - computed / answered) if answered else 0.0,
            "fairness": jain_index(list(per_run.values()))}


@ray.remote(num_cpus=0)
class Gate:
    """Holds every client of a case until all have connected, so the runs stream at the same time
    (worker processes start seconds apart)."""

    def __init__(self, parties: int) -> None:
        import asyncio

        self.parties, self.arrived, self.open = parties, 0, asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.open.set()
        await self.open.wait()


@ray.remote(num_cpus=0.5)
def stream_client(app: str, run: str, namespace: str, keys_seed: int, batch: int, image_size: int,
                  context_length: int, seconds: float, gate, prefetch: int = 2) -> int:
    """One run's request stream: batches with keys and pixels fixed by `keys_seed` (runs with the
    same seed and namespace ask for the same samples) through `RemoteTeacher`, as a student sends
    them, with no student compute between; returns the samples answered. Every step has its own
    pixels (`step_views`): the pool identifies samples by content, so a step repeating an earlier
    step's pixels would be answered from the replica's recent rows."""
    from student_trainer.config import TeacherSourceConfig
    from student_trainer.data.batches import Batch
    from student_trainer.teacher.sources import RemoteTeacher

    source = RemoteTeacher(TeacherSourceConfig(mode="remote", app_name=app, prefetch=prefetch, timeout_s=600),
                           run, view_namespace=namespace)
    rng = np.random.default_rng(keys_seed)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    tokens = rng.integers(1, 1000, (batch, context_length), dtype=np.int64)
    ray.get(gate.wait.remote())
    deadline, answered = time.monotonic() + seconds, 0

    def batches():
        for step in range(10**9):
            if time.monotonic() > deadline:
                return
            yield Batch([f"s{keys_seed}-{step}-{i}" for i in range(batch)], step_views(images, step), tokens,
                        np.zeros(batch, np.int64), [""] * batch)

    for b, _ in source.stream(batches(), view=0):
        answered += len(b)
    return answered


def step_views(images: np.ndarray, step: int) -> np.ndarray:
    """`images` with `step` written into each view's first 8 bytes: distinct pixels per step, equal
    across runs that share the base images, for the cost of one copy."""
    out = images.copy()
    out.reshape(len(out), -1)[:, :8] = np.frombuffer(np.int64(step).tobytes(), np.uint8)
    return out


def _clients_case(run: BenchRun, n: int, layout: str, case: int, info: dict) -> list[str]:
    mb = run.cfg.multi
    names = [f"{layout}-{n}-{i}-c{case}" for i in range(n)]
    gate = Gate.remote(n)
    refs = [stream_client.remote(APP, name, f"case{case}" if layout == "shared" else f"case{case}-{i}",
                                 case if layout == "shared" else 1000 * case + i, mb.batch_size,
                                 run.cfg.models.image_size, info["context_length"], mb.client_seconds, gate)
            for i, name in enumerate(names)]
    try:
        ray.get(refs)
    finally:
        ray.kill(gate)
    return names


def _train_case(run: BenchRun, n: int, layout: str, case: int) -> list[str]:
    """N `kd train` processes, as `kd sweep` runs them (each its own Ray job-like driver)."""
    from cluster.sweep import run_sweep

    mb = run.cfg.multi
    paths, names = [], []
    for i in range(n):
        cfg = train_config(run, f"{layout}-{n}-{i}", "remote", app_name=APP, losses={"clip": 1.0, "kl": 1.0 + i},
                           batch_size=mb.batch_size, steps=mb.steps, epochs=mb.epochs,
                           shards=run.train_shards(run.cfg.students.train_shards),
                           seed=1000 * case + (0 if layout == "shared" else 1 + i))
        path = run.work / f"{cfg.run_name}.yaml"
        cfg.to_yaml(path)
        paths.append(str(path))
        names.append(cfg.run_name)
    outcomes = run_sweep(paths, ray.get_runtime_context().gcs_address, ["--verbose"] if run.cfg.verbose else None)
    failed = [o.run_name for o in outcomes if o.returncode != 0]
    if failed:
        raise RuntimeError(f"multi: kd train failed for {failed}")
    return names


def one_case(run: BenchRun, handle, n: int, layout: str, case: int, info: dict) -> dict:
    poller = Poller(handle, run.cfg.multi.poll_s)
    poller.start()
    try:
        if run.cfg.multi.students == "clients":
            names = _clients_case(run, n, layout, case, info)
        else:
            names = _train_case(run, n, layout, case)
    finally:
        poller.stop.set()
        poller.join()
    return measure(poller.samples, names)


def run_multi(run: BenchRun) -> None:
    mb = run.cfg.multi
    tcfg = teacher_config(run, APP, max_batch_size=4 * mb.batch_size, request_samples=mb.batch_size)
    run.log(f"multi: deploying teacher {run.cfg.models.teacher} (app {APP}), students as {mb.students}")
    handle = deploy(tcfg, access_log=run.cfg.verbose)
    info = handle.info.remote().result(timeout_s=600)
    results: dict[tuple[str, int], list[dict]] = {}
    case = 0
    for rep in range(run.cfg.repeats):
        for layout in mb.layouts:
            for n in mb.runs:
                case += 1  # new views every case: the replica's recent rows must not carry over
                run.log(f"multi: {layout}, {n} run(s), repeat {rep + 1}/{run.cfg.repeats}")
                result = one_case(run, handle, n, layout, case + 10_000 * run.cfg.seed, info)
                if "error" in result:
                    run.log(f"multi: {layout} x{n}: {result['error']}")
                    continue
                results.setdefault((layout, n), []).append(result)
    from ray import serve

    serve.delete(APP)
    _record(run, results)


def _record(run: BenchRun, results: dict[tuple[str, int], list[dict]]) -> None:
    mb = run.cfg.multi
    for (layout, n), reps in results.items():
        params = {"layout": layout, "runs": n, "students": mb.students, "batch_size": mb.batch_size}
        label = f"{layout}, {n} run(s)"
        run.add(SECTION, f"total samples/s ({label})", "samples/s", [r["total_samples_per_s"] for r in reps],
                params=params)
        run.add(SECTION, f"per-run samples/s ({label})", "samples/s",
                [statistics.median(r["per_run_samples_per_s"].values()) for r in reps], params=params,
                note="median over the runs of a case, then over repeats")
        run.add(SECTION, f"teacher computed samples/s ({label})", "samples/s",
                [r["teacher_computed_per_s"] for r in reps], params=params)
        run.add(SECTION, f"answered without own forward ({label})", "fraction", [r["reused_fraction"] for r in reps],
                params=params, kind="derived", target=f"{1 - 1 / n:.2f} (ideal)" if layout == "shared" else "0",
                note="1 - teacher computed / samples answered, over the window all runs trained in")
        run.add(SECTION, f"fairness, Jain's index ({label})", "index", [r["fairness"] for r in reps],
                params=params, kind="derived", target="1.0 = equal shares")
        run.add(SECTION, f"teacher busy ({label})", "fraction", [r["teacher_utilisation"] for r in reps],
                params=params, kind="derived")
