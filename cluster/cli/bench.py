"""`kd bench` argument wiring only: the suite is measurement code, kept apart from the product in the
top-level `benchmarks` package (`benchmarks.suite`), and imported here, in this command's functions
alone, which is the one place product code reaches it."""
from __future__ import annotations

import argparse
import shlex
import sys

from cluster.cli.args import add_address, add_verbose
from student_trainer.teacher.modes import TeacherMode

DESCRIPTION = """\
Measure where the time and memory go, side by side in one run, and write
OUT/bench.json (every figure: median, min/max, quartiles, unit, parameters, machine, command),
OUT/bench.md (tables) and OUT/bench_*.png (plots; needs matplotlib: pip install -e '.[bench]').

Sections: students (samples/s, memory, teacher-seconds by teacher mode none/inline/remote/hybrid/
cache), pool (embeddings/s by batch size and replicas, Serve overhead vs a direct forward, wire
bytes per sample), multi (1/2/4 runs on one pool: per-run and total samples/s, reuse, fairness),
cache (read rates vs the live teacher, bytes per sample per view), scale (a labelled model, not
a measurement: teacher GPUs per student GPU for e.g. ViT-L-14 -> ViT-B-16, network limits).

Presets (sizes):
  smoke  digits-teacher/digits-student (tiny), 3 steps, 1 repeat, multi as request streams:
         about a minute; proves every section runs, its figures mean nothing
  cpu    ViT-B-16 teacher, ViT-S-16 student (real widths, random init, 64 px, 16 tokens),
         3 repeats, multi as real `kd train` processes: 34 min on a quiet 2-core
         machine (2026-12-01)
  gpu    ViT-L-14 teacher (fp16), ViT-B-16 student, 224 px, batch 128: needs >= 2 GPUs
         (teacher and students on separate GPUs); not yet run

On one machine the teacher and the students are pinned to separate cores (half each, or
--teacher-cores/--student-cores) so the run mirrors separate machines, and an embedded cluster's
own processes (GCS, raylet, controllers) and the driver run on the teacher's side; --no-pin on a
cluster.
Run it on a quiet machine: figures measured next to other work are not clean (the report
records the load average at start and end)."""


OPTIONS = ("preset", "smoke_form", "repeats", "sections", "modes", "multi_students", "out", "workdir", "no_pin", "teacher_cores", "student_cores",
           "address", "verbose")


def command_line(args: argparse.Namespace) -> str:
    """The `kd bench` command that reproduces this run (however it was invoked: shell, test, script)."""
    words = ["kd", "bench"]
    for name in OPTIONS:
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        words.append("--" + name.replace("_", "-"))
        if value is not True:
            words.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    return shlex.join(words)


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.suite.config import preset, smoke_form
    from benchmarks.suite.run import run_suite

    cfg = preset(args.preset)
    if args.smoke_form:
        import torch

        cfg = smoke_form(cfg, gpu=torch.cuda.is_available())
    if args.repeats is not None:
        cfg.repeats = args.repeats
    if args.sections:
        cfg.sections = list(args.sections)
    if args.modes:
        cfg.students.modes = list(args.modes)
    if args.multi_students:
        cfg.multi.students = args.multi_students
    cfg.out, cfg.address, cfg.workdir = args.out, args.address, args.workdir
    cfg.pin_cores, cfg.verbose = not args.no_pin, args.verbose
    cfg.teacher_cores, cfg.student_cores = args.teacher_cores, args.student_cores
    result = run_suite(cfg, command=command_line(args))
    for section, error in result["errors"].items():
        print(f"kd bench: section {section} failed: {error}", file=sys.stderr)
    return 1 if result["errors"] else 0


def suite_choice(name: str):
    """An argparse type that checks a value against `benchmarks.suite.config.<name>` when `kd bench`'s
    own arguments are parsed: building the `kd` parser imports nothing of the benchmarks package, so
    every other command works where it is not installed."""
    def check(value: str) -> str:
        from benchmarks.suite import config

        allowed = getattr(config, name)
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(allowed)})")
        return value

    return check


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("bench", formatter_class=argparse.RawDescriptionHelpFormatter, description=DESCRIPTION,
                       help="benchmark suite: throughput, memory, pool, cache, scale model")
    p.add_argument("--preset", type=suite_choice("PRESETS"), default="smoke",
                   help="sizes: smoke, cpu or gpu (see above); default smoke")
    p.add_argument("--smoke-form", action="store_true",
                   help="the preset's structure (sections, modes, layouts, architecture families) at smoke "
                        "sizes, on CPU when there is no GPU: proves e.g. --preset gpu runs end to end before "
                        "GPU time is spent on it; its figures mean nothing")
    p.add_argument("--repeats", type=int, help="repeats per measurement (preset default: smoke 1, cpu/gpu 3)")
    p.add_argument("--sections", nargs="+", type=suite_choice("SECTIONS"),
                   help="only these sections: students, pool, multi, cache, scale (default: all)")
    p.add_argument("--modes", nargs="+", choices=TeacherMode.values(),
                   help="teacher modes of the students section (default: all)")
    p.add_argument("--multi-students", choices=["train", "clients"],
                   help="section 3's runs: real `kd train` processes, or request streams without student compute "
                        "(preset default: smoke clients, cpu/gpu train)")
    p.add_argument("--out", default="benchmarks/results", help="where bench.json/.md/.png go")
    p.add_argument("--workdir", help="data, caches and runs (default: a temporary directory); on a multi-node "
                                     "cluster give shared storage")
    p.add_argument("--no-pin", action="store_true", help="do not pin teacher and students to separate cores")
    p.add_argument("--teacher-cores", type=int, help="cores for the teacher (default: half)")
    p.add_argument("--student-cores", type=int, help="cores for the students (default: the rest)")
    add_address(p)
    add_verbose(p)
    p.set_defaults(func=cmd_bench)
