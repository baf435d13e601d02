"""`kd sweep`: several student runs at once on one teacher pool (`cluster.sweep`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cluster.cli.args import add_address, add_verbose


def cmd_sweep(args: argparse.Namespace) -> int:
    import ray

    from cluster.local import init_ray
    from cluster.sweep import run_sweep

    for path in args.configs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"sweep config {path!r} does not exist")
    print(init_ray(args.address, verbose=args.verbose))
    address = ray.get_runtime_context().gcs_address
    outcomes = run_sweep(args.configs, address, ["--verbose"] if args.verbose else None)
    print(f"\n{'run':32} {'exit':>4} {'wall s':>7} {'samples/s':>10} {'teacher samples':>16}")
    for o in outcomes:
        m = o.metrics or {}
        print(f"{o.run_name:32} {o.returncode:4d} {o.wall_time_s:7.1f} "
              f"{m.get('run_samples_per_s', float('nan')):10.1f} {m.get('teacher_samples', 0):16}")
    return 0 if all(o.returncode == 0 for o in outcomes) else 1


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("sweep", formatter_class=fmt, help="several student runs at once on one teacher",
                       description="Run several student configs concurrently, each as its own "
                                   "`kd train` process on the same Ray cluster, all attached to the "
                                   "teacher app their configs name. Run names must be unique.")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="TrainConfig YAML files")
    add_address(p)
    add_verbose(p)
    p.set_defaults(func=cmd_sweep)
