"""`kd report`: PNG learning curves and final metrics of finished runs (`cluster.report`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> int:
    from cluster.report import write_report

    doc = write_report([Path(p) for p in args.run_dirs], Path(args.out), baseline=args.baseline,
                       val_shards=args.val_shards, eval_limit=args.eval_limit)
    print(f"{len(doc['runs'])} run(s): {', '.join(doc['runs'])}")
    for line in time_to_quality_lines(doc.get("time_to_quality")):
        print(line)
    for name in doc["plots"]:
        print(f"wrote {Path(args.out) / name}")
    print(f"wrote {Path(args.out) / 'report.json'}")
    return 0


def time_to_quality_lines(reading: dict | None) -> list[str]:
    """`steps to the baseline's final zero-shot top-1 (0.7520, b):` then one line per run with a curve."""
    if not reading:
        return []
    lines = [f"steps to the baseline's final zero-shot top-1 ({reading['zero_shot_top1']:.4f}, {reading['baseline']}):"]
    for name, point in reading["runs"].items():
        lines.append(f"  {name}: never" if point is None else
                     f"  {name}: {point['step']} steps, {point['samples_seen']} samples, "
                     f"{point['train_wall_s']:.1f} s training, {point['teacher_s']:.1f} teacher-s")
    return lines


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("report", formatter_class=fmt, help="PNG learning curves and final metrics of runs",
                       description="Read what finished runs left (Ray Train's checkpoint snapshot, each "
                                   "checkpoint's metrics.json, TensorBoard event files) and draw the runs' "
                                   "learning curves side by side and a bar chart of their final metrics "
                                   "(with the baseline a demo report.json names), next to a report.json.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run folder (<storage_path>/<run_name>), a storage path holding runs, or a demo workdir")
    p.add_argument("--out", default="kd-report", help="folder for the PNGs and report.json (an existing "
                                                      "report.json there is kept and extended)")
    p.add_argument("--baseline", metavar="RUN", help="name of the run or model drawn as the baseline; runs with an "
                   "evaluation curve (kd train --eval-every) also get the steps, samples, training time and "
                   "teacher-seconds they took to reach its final zero-shot top-1")
    p.add_argument("--val-shards", help="evaluate each run's latest checkpoint on these shards first (zero-shot "
                                        "top-1/top-5, retrieval R@1 bars), e.g. 'data/val-*.tar'")
    p.add_argument("--eval-limit", type=int, help="evaluate at most this many validation samples")
    p.set_defaults(func=cmd_report)
