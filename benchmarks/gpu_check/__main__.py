"""`python -m benchmarks.gpu_check`: run sections into a results folder, or write its report.

    python -m benchmarks.gpu_check --out DIR [--dry-run] [--set field=JSON ...] SECTION [SECTION ...]
    python -m benchmarks.gpu_check --report DIR

`benchmarks/gpu_check.sh` calls it once per section (each under its own timeout), then --report.
`--set` changes one `GpuCheckConfig` field, e.g. `--set student_steps=5 --set 'precisions=["fp16"]'`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from benchmarks.gpu_check.config import SECTIONS, GpuCheckConfig, dry_run_config, gpu_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", help=f"sections to run, in order (of {', '.join(SECTIONS)})")
    p.add_argument("--out", type=Path, help="results folder (sections/<name>.json are written there)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: proves the path, measures nothing")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a config field")
    p.add_argument("--report", type=Path, metavar="DIR", help="write DIR/gpu_check.json and .md from its sections")
    args = p.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}: expected some of {', '.join(SECTIONS)}")
    if args.report is None and (not args.sections or args.out is None):
        p.error("give sections and --out, or --report DIR")
    return args


def config_from(args: argparse.Namespace) -> GpuCheckConfig:
    """The preset (dry run or GPU) with the --set overrides, validated."""
    cfg = dry_run_config() if args.dry_run else gpu_config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or name not in fields or name == "dry_run":
            raise SystemExit(f"--set {item!r}: expected FIELD=JSON with FIELD one of {sorted(fields - {'dry_run'})}")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            changes[name] = value  # a bare string, e.g. --set teacher=ViT-B-16
    try:
        return dataclasses.replace(cfg, **changes).validate()
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--set: {e}") from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        from benchmarks.gpu_check.report import write_report

        return write_report(args.report)
    from benchmarks.gpu_check.run import Workspace, run_section

    cfg = config_from(args)
    ws = Workspace(cfg)
    try:
        statuses = [run_section(name, cfg, ws, args.out)["status"] for name in args.sections]
    finally:
        ws.close()
    return 0 if all(s in ("ok", "skipped") for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
