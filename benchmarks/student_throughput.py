"""Student throughput by teacher mode: none, inline (OpenCLIP-style), remote (Serve pool), cache
(precomputed embeddings, no teacher running) and hybrid (cache hits + pool misses, appended).

The same student, data and batch size in one run; prints samples/s per mode, the ratio to
no-teacher, the student worker's peak RSS, the time it spent waiting for the teacher, and the
teacher-seconds the mode cost: the Serve pool's forward time during the run (remote, hybrid), the
in-worker teacher time (inline), none at train time for cache (its one-off precompute cost is
printed separately; it is paid once for every run and epoch that reads the cache). `hybrid` starts
from an empty cache (every sample a miss: the cold worst case); `hybrid-warm` reruns on the cache
that run filled (every sample a hit).

It also measures the cache's read path against the teacher's compute rate and the student's step
rate: opening/indexing, loading embeddings from Parquet (rows/s, MB/s) and serving batches from
memory; `--synthetic-dim 768` adds the same read figures for a synthetic cache of that width.

On a CPU machine the student worker and the teacher replica each run one torch thread, so on a
2-core machine they occupy separate cores, mirroring separate student and teacher machines.

    python benchmarks/student_throughput.py --steps 40 --repeats 3
    python benchmarks/student_throughput.py --modes none cache hybrid hybrid-warm --steps 20
    python benchmarks/student_throughput.py --read-only --synthetic-dim 768 --synthetic-rows 50000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.local import init_ray
from student_trainer.config import DataConfig, ModelConfig, TeacherSourceConfig, TrainConfig
from student_trainer.data import resolve_shards, shard_sample_counts
from student_trainer.datasets import write_digits_shards
from student_trainer.factory import resolve_model
from student_trainer.train import run_training
from teacher_service.config import TeacherConfig
from teacher_service.deployment import deploy

MODES = ("none", "inline", "remote", "cache", "hybrid", "hybrid-warm")
SEED = 0
IMAGE_SIZE = 32


def teacher_config(args: argparse.Namespace) -> TeacherConfig:
    arch, overrides = resolve_model(ModelConfig(name=args.teacher))
    return TeacherConfig(model=arch, overrides=overrides, app_name="kd-bench-teacher",
                         num_cpus=1.0, torch_threads=1, max_batch_size=4 * args.batch_size)


def pool_forward_s(handle) -> float:
    """The Serve pool's summed forward time so far (all replicas)."""
    try:
        from teacher_service.deployment import collect_stats

        return float(collect_stats(handle)["forward_s"])
    except ImportError:  # older deployments: one replica's counters
        return float(handle.stats.remote().result(timeout_s=30)["forward_s"])


def run_mode(mode: str, args: argparse.Namespace, data_dir: Path, storage: Path, rep: int, caches: dict,
             handle) -> dict:
    tcfg = teacher_config(args)
    base_mode = "hybrid" if mode.startswith("hybrid") else mode
    if mode == "hybrid":
        caches[rep] = storage / f"hybrid-cache-{rep}-{int(time.time())}"  # cold: a fresh, empty cache
    cache_path = {"cache": caches.get("precomputed"), "hybrid": caches.get(rep),
                  "hybrid-warm": caches.get(rep)}.get(mode)
    losses = {"clip": 1.0} if mode == "none" else {"clip": 1.0, "kl": 1.0, "fd": 2000.0}
    cfg = TrainConfig(
        run_name=f"bench-{mode}-{rep}-{int(time.time())}", storage_path=str(storage),
        model=ModelConfig(name=args.student),
        data=DataConfig(train_shards=str(data_dir / "train-*.tar"), batch_size=args.batch_size,
                        image_size=IMAGE_SIZE),
        teacher=TeacherSourceConfig(mode=base_mode, app_name=tcfg.app_name,
                                    teacher=tcfg if mode == "inline" else None,
                                    cache_path=str(cache_path) if cache_path else None,
                                    prefetch=args.prefetch),
        losses=losses, epochs=1, max_steps_per_epoch=args.steps, num_workers=args.workers,
        log_every_steps=0, torch_threads=1, seed=SEED,
    )
    pool_before = pool_forward_s(handle)
    metrics = run_training(cfg).metrics
    pool_s = pool_forward_s(handle) - pool_before
    teacher_s = metrics.get("teacher_wait_s", 0.0) if mode == "inline" else pool_s
    return {"samples_per_s": metrics["train_samples_per_s"], "peak_rss_mb": metrics["peak_rss_mb"],
            "teacher_wait_s": metrics.get("teacher_wait_s", 0.0), "teacher_s": round(teacher_s, 3),
            "teacher_requests": metrics.get("teacher_requests", 0),
            "cache_hits": metrics.get("teacher_cache_hits"), "cache_misses": metrics.get("teacher_cache_misses"),
            "cache_read_s": metrics.get("teacher_cache_read_s"), "epoch_time_s": metrics.get("epoch_time_s")}


def precompute_cache(args: argparse.Namespace, data_dir: Path, out: Path) -> dict:
    from teacher_service.precompute import precompute

    shards = resolve_shards(str(data_dir / "train-*.tar"))
    summary = precompute(shards, str(out), views=1, teacher=teacher_config(args), image_size=IMAGE_SIZE,
                         seed=SEED, num_cpus=1.0, concurrency=1, batch_size=args.batch_size,
                         counts=shard_sample_counts(shards), progress=True)
    return {"rows": summary.rows, "wall_s": round(summary.wall_s, 2), "teacher_s": round(summary.teacher_s, 2),
            "teacher_rows_per_s": round(summary.rows / max(summary.teacher_s, 1e-9), 1)}


def read_throughput(path: str, batch_size: int, batches: int = 200) -> dict:
    """Open + index, full load of the embeddings from Parquet, then random batches from memory."""
    from teacher_service.cache import EmbeddingCache

    start = time.perf_counter()
    cache = EmbeddingCache.open(path)
    open_s = time.perf_counter() - start
    locs = list(cache.index.values())
    start = time.perf_counter()
    for seg in range(len(cache.segments)):
        cache._loaded(seg)
    load_s = time.perf_counter() - start
    nbytes = sum(os.path.getsize(f) for f in cache.files)
    rng = np.random.default_rng(0)
    picks = [[locs[i] for i in rng.integers(0, len(locs), batch_size)] for _ in range(batches)]
    start = time.perf_counter()
    for p in picks:
        cache.fetch(p)
    serve_s = time.perf_counter() - start
    rows = len(cache)
    return {"rows": rows, "embed_dim": cache.embed_dim, "bytes_per_row": round(nbytes / max(rows, 1), 1),
            "index_rows_per_s": round(rows / open_s), "load_rows_per_s": round(rows / load_s),
            "load_mb_per_s": round(nbytes / load_s / 2**20, 1),
            "serve_rows_per_s": round(batches * batch_size / serve_s)}


def synthetic_cache(out: Path, dim: int, rows: int, rows_per_file: int = 10000) -> str:
    """A cache of random fp16 rows of width `dim` (read benchmarks at real teacher widths)."""
    from teacher_service.cache import make_meta, rows_table, write_table_atomic
    from teacher_service.views import view_recipe

    out.mkdir(parents=True, exist_ok=True)
    info = {"fingerprint": f"synthetic-{dim}", "embed_dim": dim, "model": "synthetic", "context_length": 77,
            "preprocess": None, "logit_scale": 100.0, "logit_bias": None}
    meta = make_meta(info, view_recipe(224, 0), kind="shard", views=1)
    rng = np.random.default_rng(0)
    for start in range(0, rows, rows_per_file):
        n = min(rows_per_file, rows - start)
        emb = rng.standard_normal((n, dim)).astype(np.float16)
        keys = [f"sample-{start + i:09d}" for i in range(n)]
        write_table_atomic(rows_table(meta, keys, 0, emb, emb, np.arange(n), np.arange(n)),
                           str(out / f"train-{start // rows_per_file:06d}.parquet"))
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="digits-student")
    parser.add_argument("--teacher", default="digits-teacher")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    parser.add_argument("--workers", type=int, default=1, help="student DDP workers")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; medians reported")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--synthetic-dim", type=int, help="also measure reads of a synthetic cache this wide")
    parser.add_argument("--synthetic-rows", type=int, default=50000)
    parser.add_argument("--read-only", action="store_true",
                        help="only the synthetic cache read figures (no Ray, no training)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.read_only:
        if not args.synthetic_dim:
            parser.error("--read-only needs --synthetic-dim")
        with tempfile.TemporaryDirectory() as tmp:
            path = synthetic_cache(Path(tmp) / "synthetic", args.synthetic_dim, args.synthetic_rows)
            print(json.dumps(read_throughput(path, args.batch_size)))
        return
    modes = [m for m in MODES if m in args.modes]
    if "hybrid-warm" in modes and "hybrid" not in modes:
        parser.error("hybrid-warm reruns on the cache the hybrid run filled: include hybrid")

    print(init_ray(num_cpus=4))
    results: dict[str, list[dict]] = {m: [] for m in modes}
    extra: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        write_digits_shards(data_dir, image_size=32, samples_per_shard=200)
        handle = deploy(teacher_config(args))
        handle.info.remote().result(timeout_s=300)
        caches: dict = {}
        if "cache" in modes:
            caches["precomputed"] = Path(tmp) / "precomputed"
            extra["precompute"] = precompute_cache(args, data_dir, caches["precomputed"])
            print("precompute", extra["precompute"], flush=True)
        for rep in range(args.repeats):
            for mode in modes:  # interleaved so drift hits every mode alike
                results[mode].append(run_mode(mode, args, data_dir, Path(tmp) / "runs", rep, caches, handle))
                print(mode, rep, results[mode][-1], flush=True)
        if "cache" in modes:
            extra["read"] = read_throughput(str(caches["precomputed"]), args.batch_size)
        if args.synthetic_dim:
            path = synthetic_cache(Path(tmp) / "synthetic", args.synthetic_dim, args.synthetic_rows)
            extra["read_synthetic"] = read_throughput(path, args.batch_size)

    base_mode = "none" if "none" in modes else modes[0]
    base = statistics.median(r["samples_per_s"] for r in results[base_mode])
    summary = {}
    print(f"\n{'mode':12} {'samples/s':>10} {'min..max':>15} {'ratio':>6} {'peak RSS MB':>12} {'wait s':>7} "
          f"{'teacher s':>9}   (ratio to {base_mode})")
    for mode in modes:
        runs = results[mode]
        sps = [r["samples_per_s"] for r in runs]
        med = statistics.median(sps)
        summary[mode] = {"samples_per_s_median": med, "samples_per_s_min": min(sps),
                         "samples_per_s_max": max(sps), f"ratio_to_{base_mode}": med / base,
                         "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in runs),
                         "teacher_wait_s_median": statistics.median(r["teacher_wait_s"] for r in runs),
                         "teacher_s_median": statistics.median(r["teacher_s"] for r in runs), "runs": runs}
        s = summary[mode]
        print(f"{mode:12} {med:10.1f} {min(sps):7.1f}..{max(sps):<7.1f} {med / base:6.2f} "
              f"{s['peak_rss_mb_median']:12.0f} {s['teacher_wait_s_median']:7.2f} {s['teacher_s_median']:9.2f}")
    for name, value in extra.items():
        print(name, json.dumps(value))
    if "read" in extra and "precompute" in extra:
        student = max(summary[m]["samples_per_s_median"] for m in modes)
        print(f"rows/s: cache load {extra['read']['load_rows_per_s']}, cache serve "
              f"{extra['read']['serve_rows_per_s']}, teacher compute {extra['precompute']['teacher_rows_per_s']}, "
              f"fastest student {student:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "modes": summary, **extra}, indent=2))


if __name__ == "__main__":
    main()
