"""`kd precompute` and `kd cache info|audit|compact`: the teacher embedding cache from the command line.

Shard specs are resolved with the one shard reader's rules (`teacher_service.shards`), so
`--shards` means exactly what `kd train --train-shards` means.
"""
from __future__ import annotations

import argparse
import os
import sys

from cluster.cli.args import (MODEL_FLAGS, add_address, add_teacher_model_args, add_verbose, given, print_result,
                              teacher_config)


def _teacher_args(p: argparse.ArgumentParser, *, required_hint: str) -> None:
    g = p.add_argument_group("teacher", f"a local teacher (actor pool) or a running app; {required_hint}")
    g.add_argument("--teacher-config", help="TeacherConfig YAML (flags below override it)")
    add_teacher_model_args(g)
    g.add_argument("--app-name", help="use this running teacher app instead of loading the teacher")


def teacher_from_args(args: argparse.Namespace):
    """(TeacherConfig or None, app_name or None) from the flags; both given is an error."""
    flags = given(args, MODEL_FLAGS)
    local = bool(args.teacher_config or flags)
    if local and args.app_name:
        raise ValueError("give either a local teacher (--teacher-config/--model/...) or --app-name, not both")
    if not local:
        return None, args.app_name
    return teacher_config(args.teacher_config, flags), None


def cmd_precompute(args: argparse.Namespace) -> int:
    from cluster.local import init_ray
    from teacher_service.cache.precompute import precompute, precompute_centroids
    from teacher_service.shards import resolve_shards

    teacher, app_name = teacher_from_args(args)
    if teacher is None and app_name is None:
        raise ValueError("kd precompute needs a teacher: --teacher-config YAML, --model ..., or --app-name")
    shards = resolve_shards(args.shards)
    if args.class_centroids:
        path = precompute_centroids(shards, args.out, args.class_centroids, teacher=teacher, app_name=app_name,
                                    image_size=args.image_size, num_classes=args.num_classes, seed=args.seed)
        print_result({"centroids": path, "per_class": args.class_centroids}, args.json)
        return 0
    import ray.data  # noqa: F401 - configures its logger, which init_ray then quiets unless --verbose

    print(init_ray(args.address, verbose=args.verbose), file=sys.stderr)
    num_cpus = args.num_cpus if args.num_cpus is not None else (teacher.num_cpus if teacher else 0.25)
    num_gpus = args.num_gpus if args.num_gpus is not None else (teacher.num_gpus if teacher else 0.0)
    summary = precompute(shards, args.out, views=args.views, teacher=teacher, app_name=app_name,
                         image_size=args.image_size, seed=args.seed, tokenizer=args.tokenizer,
                         context_length=args.context_length, batch_size=args.batch_size,
                         concurrency=args.concurrency, num_cpus=num_cpus, num_gpus=num_gpus,
                         progress=not args.json)
    result = summary.to_dict()
    for name in ("computed", "skipped", "recomputed"):
        result[name] = len(result[name]) if not args.json else result[name]
    print_result(result, args.json)
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    from teacher_service.cache import EmbeddingCache

    cache = EmbeddingCache.open(args.cache)
    size = sum(os.path.getsize(f) for f in cache.files)
    views = sorted({v for _, v in cache.index})
    print_result({"cache": cache.path, "fingerprint": cache.fingerprint, "teacher": cache.meta["teacher"].get("model"),
                  "embed_dim": cache.embed_dim, "rows": len(cache), "files": len(cache.files),
                  "duplicate_rows": cache.duplicates, "views": views, "recipe": cache.recipe,
                  "bytes": size, "bytes_per_row": round(size / max(1, len(cache) + cache.duplicates), 1)}, args.json)
    return 0


def cmd_cache_audit(args: argparse.Namespace) -> int:
    from teacher_service.cache.audit import audit_cache
    from teacher_service.shards import resolve_shards

    teacher, app_name = teacher_from_args(args)
    if app_name:
        from cluster.local import init_ray

        init_ray(args.address or "auto", quiet=True)
    shards = resolve_shards(args.shards) if args.shards else None
    report = audit_cache(args.cache, teacher=teacher, app_name=app_name, samples=args.samples, shards=shards,
                         seed=args.seed, threshold=args.threshold)
    print_result(report.to_dict(), args.json)
    if not report.ok:
        print(f"kd: cache audit FAILED: worst cosine image {report.worst_image_cosine:.5f} / text "
              f"{report.worst_text_cosine:.5f} (threshold {report.threshold}), "
              f"{report.digest_mismatches} digest mismatches", file=sys.stderr)
        return 1
    return 0


def cmd_cache_compact(args: argparse.Namespace) -> int:
    from teacher_service.cache import compact

    report = compact(args.cache)
    print_result({"merged_files": len(report.merged_files), "rows_written": report.rows_written,
                  "duplicates_dropped": report.duplicates_dropped, "out": report.out_path,
                  "stale_tmp_removed": len(report.stale_tmp_removed)}, args.json)
    return 0


def add_parser(sub, fmt) -> None:
    """Register `precompute` and `cache` on the `kd` subparsers."""
    p = sub.add_parser(
        "precompute", formatter_class=fmt, help="precompute teacher embeddings into a Parquet cache",
        description="Embed K replayable views of every sample of the shards with the teacher (an actor pool "
                    "fed by Ray Data, or a running app) into CACHE: one Parquet file per shard. Bad samples "
                    "are skipped and counted by reason, as training skips them. "
                    "Resumable: finished shards are skipped. --image-size and --seed must match the student "
                    "run (data.image_size, seed); view v is what epoch v trains on.")
    _teacher_args(p, required_hint="one is required")
    p.add_argument("--shards", required=True, help="shard dir, glob or brace pattern (as for kd train)")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--views", type=int, default=1, help="views per sample (0..K-1 = epochs 0..K-1)")
    p.add_argument("--image-size", type=int, default=32, help="the student's data.image_size")
    p.add_argument("--seed", type=int, default=0, help="the student's seed (augmentation; centroid sampling)")
    p.add_argument("--tokenizer", help="open_clip tokenizer name (default: the teacher's model)")
    p.add_argument("--context-length", type=int, help="tokenizer context length (default: the teacher's)")
    p.add_argument("--class-centroids", type=int, metavar="N",
                   help="instead of rows, write Embed-KD class centroids (mean of N samples per class, drawn "
                        "with --seed) to CACHE/centroids.parquet")
    p.add_argument("--num-classes", type=int, help="classes for --class-centroids (default: dataset.json)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per teacher request")
    p.add_argument("--concurrency", type=int, default=1, help="teacher actors")
    p.add_argument("--num-cpus", type=float, help="CPUs per teacher actor (default: the teacher config's)")
    p.add_argument("--num-gpus", type=float, help="GPUs per teacher actor (default: the teacher config's)")
    add_address(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    add_verbose(p)
    p.set_defaults(func=cmd_precompute)

    cache = sub.add_parser("cache", formatter_class=fmt, help="inspect, audit and compact an embedding cache")
    c_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    p = c_sub.add_parser("info", formatter_class=fmt, help="rows, files, teacher, recipe, bytes per row")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache_info)

    p = c_sub.add_parser("audit", formatter_class=fmt, help="cached vs live teacher on a random sample",
                         description="Recompute a random sample of cached rows with the live teacher (the "
                                     "teacher config the cache recorded, the flags below, or --app-name) and "
                                     "report the worst cosine agreement. Exit 1 below --threshold.")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--samples", type=int, default=64, help="rows to recompute")
    p.add_argument("--shards", help="where to find samples of appended (hybrid) rows")
    p.add_argument("--seed", type=int, default=0, help="which rows are sampled")
    p.add_argument("--threshold", type=float, default=0.999, help="minimum cosine agreement")
    _teacher_args(p, required_hint="default: the teacher config recorded in the cache")
    add_address(p, "running")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache_audit)

    p = c_sub.add_parser("compact", formatter_class=fmt, help="merge append files without duplicates",
                         description="Merge the append files hybrid runs wrote into one compacted file, "
                                     "dropping duplicate (key, view) rows. Run it when no run reads the cache.")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache_compact)
