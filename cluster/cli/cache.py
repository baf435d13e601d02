"""`kd precompute` and `kd cache info|audit|compact`: the teacher embedding cache from the command line.

A cache root holds one set of rows per teacher (`teacher_service.cache.store`): `kd precompute`
takes several teachers (repeated --teacher-config / --app-name) and fills each one's rows; `info`,
`audit` and `compact` go over every teacher of the root, one result per teacher.

Shard specs are resolved with the one shard reader's rules (`teacher_service.shards`), so
`--shards` means exactly what `kd train --train-shards` means.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from teacher_service.config import ANSWER_DTYPES

from cluster.cli.args import (MODEL_FLAGS, add_address, add_app_names, add_teacher_model_args, add_verbose, given,
                              print_per_teacher, teacher_config)


def _teacher_args(p: argparse.ArgumentParser, *, required_hint: str) -> None:
    g = p.add_argument_group("teachers", "local teachers (actor pools) and/or running apps, each with its own rows "
                                         f"in the cache; {required_hint}")
    g.add_argument("--teacher-config", action="append", metavar="YAML",
                   help="TeacherConfig YAML (repeat for several teachers; the flags below override a single one)")
    add_teacher_model_args(g)
    add_app_names(g, "use this running teacher app instead of loading the teacher")


def teachers_from_args(args: argparse.Namespace) -> list[tuple[Optional[Any], Optional[str]]]:
    """(TeacherConfig, None) for each local teacher, then (None, app_name) for each app, in the order given.

    The model flags describe one teacher: alone, or on top of a single ``--teacher-config``."""
    flags = given(args, MODEL_FLAGS)
    paths = args.teacher_config or []
    if flags and len(paths) > 1:
        raise ValueError("the model flags (--model/...) describe one teacher: give them with at most one "
                         "--teacher-config, or put them in each YAML")
    local = [teacher_config(path, flags) for path in paths] or ([teacher_config(None, flags)] if flags else [])
    return [(t, None) for t in local] + [(None, app) for app in args.app_name or []]


def _precompute_one(args: argparse.Namespace, shards: list[str], teacher, app_name: Optional[str]) -> dict:
    """One teacher's rows (or centroids) into the cache root ``args.out``: its result as printed."""
    from teacher_service.cache.precompute import precompute, precompute_centroids

    if args.class_centroids:
        path = precompute_centroids(shards, args.out, args.class_centroids, teacher=teacher, app_name=app_name,
                                    image_size=args.image_size, num_classes=args.num_classes, seed=args.seed)
        return {"centroids": path, "per_class": args.class_centroids}
    num_cpus = args.num_cpus if args.num_cpus is not None else (teacher.serving.num_cpus if teacher else 0.25)
    num_gpus = args.num_gpus if args.num_gpus is not None else (teacher.serving.num_gpus if teacher else 0.0)
    summary = precompute(shards, args.out, views=args.views, teacher=teacher, app_name=app_name,
                         image_size=args.image_size, seed=args.seed, tokenizer=args.tokenizer,
                         context_length=args.context_length, batch_size=args.batch_size,
                         concurrency=args.concurrency, num_cpus=num_cpus, num_gpus=num_gpus,
                         answer_dtype=args.answer_dtype, progress=not args.json)
    result = summary.to_dict()
    for name in ("computed", "skipped", "recomputed"):
        result[name] = len(result[name]) if not args.json else result[name]
    return result


def cmd_precompute(args: argparse.Namespace) -> int:
    from cluster.local import init_ray
    from teacher_service.shards import resolve_shards

    teachers = teachers_from_args(args)
    if not teachers:
        raise ValueError("kd precompute needs a teacher: --teacher-config YAML, --model ..., or --app-name "
                         "(repeat them for several teachers)")
    shards = resolve_shards(args.shards)
    if not args.class_centroids:
        import ray.data  # noqa: F401 - configures its logger, which init_ray then quiets unless --verbose

        print(init_ray(args.address, verbose=args.verbose), file=sys.stderr)
    results = {}
    for teacher, app_name in teachers:  # one after another: each teacher's actors get the whole cluster
        result = _precompute_one(args, shards, teacher, app_name)
        results[result.get("fingerprint") or result["centroids"]] = result
    print_per_teacher(results, args.json)
    return 0


def _cache_info(path: str) -> dict:
    """One teacher's rows: who, how many, which views and recipe, bytes."""
    from teacher_service.cache import EmbeddingCache

    cache = EmbeddingCache.open(path)
    size = sum(os.path.getsize(f) for f in cache.files)
    views = sorted({v for _, v in cache.index})
    return {"cache": cache.path, "fingerprint": cache.fingerprint, "teacher": cache.meta["teacher"].get("model"),
            "embed_dim": cache.embed_dim, "answer_dtype": cache.answer_dtype, "rows": len(cache), "files": len(cache.files),
            "duplicate_rows": cache.duplicates, "views": views, "recipe": cache.recipe,
            "bytes": size, "bytes_per_row": round(size / max(1, len(cache) + cache.duplicates), 1)}


def cmd_cache_info(args: argparse.Namespace) -> int:
    from teacher_service.cache import cache_teachers

    teachers = cache_teachers(args.cache) or {"": args.cache}  # none: let the reader say why
    print_per_teacher({fp: _cache_info(path) for fp, path in teachers.items()}, args.json)
    return 0


def cmd_cache_audit(args: argparse.Namespace) -> int:
    from teacher_service.cache import cache_teachers
    from teacher_service.cache.audit import audit_cache
    from teacher_service.shards import resolve_shards

    teachers = teachers_from_args(args)
    if any(app for _, app in teachers):
        from cluster.local import init_ray

        init_ray(args.address or "auto", quiet=True)
    shards = resolve_shards(args.shards) if args.shards else None
    # no teacher named: each teacher of the cache, loaded from the config its rows recorded
    asked = [dict(teacher=t, app_name=a) for t, a in teachers] or \
        [dict(fingerprint=fp) for fp in cache_teachers(args.cache) or [None]]
    reports = [audit_cache(args.cache, samples=args.samples, shards=shards, seed=args.seed,
                           threshold=args.threshold, **who) for who in asked]
    print_per_teacher({r.fingerprint: r.to_dict() for r in reports}, args.json)
    failed = [r for r in reports if not r.ok]
    for report in failed:
        print(f"kd: cache audit FAILED for teacher {report.fingerprint}: worst cosine image "
              f"{report.worst_image_cosine:.5f} / text {report.worst_text_cosine:.5f} (threshold {report.threshold}), "
              f"{report.digest_mismatches} digest mismatches", file=sys.stderr)
    return 1 if failed else 0


def cmd_cache_compact(args: argparse.Namespace) -> int:
    from teacher_service.cache import cache_teachers, compact

    results = {}
    for fp, path in (cache_teachers(args.cache) or {"": args.cache}).items():
        report = compact(path)
        results[fp] = {"merged_files": len(report.merged_files), "rows_written": report.rows_written,
                       "duplicates_dropped": report.duplicates_dropped, "out": report.out_path,
                       "stale_tmp_removed": len(report.stale_tmp_removed)}
    print_per_teacher(results, args.json)
    return 0


def add_parser(sub, fmt) -> None:
    """Register `precompute` and `cache` on the `kd` subparsers."""
    p = sub.add_parser(
        "precompute", formatter_class=fmt, help="precompute teacher embeddings into a Parquet cache",
        description="Embed K replayable views of every sample of the shards with each teacher given (an actor "
                    "pool fed by Ray Data, or a running app) into CACHE/teachers/<fingerprint>/: one Parquet "
                    "file per shard, one directory per teacher, teachers one after another. Bad samples "
                    "are skipped and counted by reason, as training skips them. "
                    "Resumable: finished shards are skipped. --image-size and --seed must match the student "
                    "run (data.image_size, seed); view v is what epoch v trains on.")
    _teacher_args(p, required_hint="at least one is required")
    p.add_argument("--shards", required=True, help="shard dir, glob or brace pattern (as for kd train)")
    p.add_argument("--out", required=True, help="cache directory (several teachers may share one)")
    p.add_argument("--views", type=int, default=1, help="views per sample (0..K-1 = epochs 0..K-1)")
    p.add_argument("--image-size", type=int, default=32, help="the student's data.image_size")
    p.add_argument("--seed", type=int, default=0, help="the student's seed (augmentation; centroid sampling)")
    p.add_argument("--tokenizer", help="open_clip tokenizer name (default: the teacher's model)")
    p.add_argument("--context-length", type=int, help="tokenizer context length (default: the teacher's)")
    p.add_argument("--class-centroids", type=int, metavar="N",
                   help="instead of rows, write Embed-KD class centroids (mean of N samples per class, drawn "
                        "with --seed) to centroids.parquet in each teacher's directory of CACHE")
    p.add_argument("--num-classes", type=int, help="classes for --class-centroids (default: dataset.json)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per teacher request")
    p.add_argument("--answer-dtype", choices=ANSWER_DTYPES,
                   help="dtype the rows are stored in: fp16, bf16, or int8 (about half fp16's bytes; "
                        "docs/design.md has the error it costs). Default: the dtype of the rows this teacher "
                        "already has in --out, else the teacher config's serving.answer_dtype (fp16)")
    p.add_argument("--concurrency", type=int, default=1, help="teacher actors")
    p.add_argument("--num-cpus", type=float, help="CPUs per teacher actor (default: the teacher config's)")
    p.add_argument("--num-gpus", type=float, help="GPUs per teacher actor (default: the teacher config's)")
    add_address(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    add_verbose(p)
    p.set_defaults(func=cmd_precompute)

    cache = sub.add_parser("cache", formatter_class=fmt, help="inspect, audit and compact an embedding cache",
                           description="Inspect (info), check against the live teacher (audit) or merge the "
                                       "append files of (compact) an embedding cache that kd precompute or "
                                       "hybrid runs wrote.")
    c_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    p = c_sub.add_parser("info", formatter_class=fmt, help="each teacher's rows, files, recipe, bytes per row",
                         description="For each teacher of the cache: its model, rows, files, duplicate rows, views, "
                                     "view recipe and bytes per row (read from the files; no teacher is loaded).")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache_info)

    p = c_sub.add_parser("audit", formatter_class=fmt, help="cached vs live teacher on a random sample",
                         description="Recompute a random sample of each teacher's cached rows with that teacher "
                                     "live (the teacher config its rows recorded, or the teachers the flags below "
                                     "name, each auditing its own fingerprint's rows) and "
                                     "report the worst cosine agreement. Exit 1 below --threshold.")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--samples", type=int, default=64, help="rows to recompute per teacher")
    p.add_argument("--shards", help="where to find samples of appended (hybrid) rows")
    p.add_argument("--seed", type=int, default=0, help="which rows are sampled")
    p.add_argument("--threshold", type=float, default=0.999, help="minimum cosine agreement")
    _teacher_args(p, required_hint="default: every teacher of the cache, loaded from the config its rows recorded")
    add_address(p, "running")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache_audit)

    p = c_sub.add_parser("compact", formatter_class=fmt, help="merge append files without duplicates",
                         description="Merge the append files hybrid runs wrote into one compacted file per teacher, "
                                     "dropping duplicate (key, view) rows. Run it when no run reads the cache.")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache_compact)
