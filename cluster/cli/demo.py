"""`kd demo`: the end-to-end demo on an embedded local cluster (`cluster.demo`)."""
from __future__ import annotations

import argparse

from cluster.cli.args import add_address, add_verbose


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.demo import DemoConfig, check_models, run_demo

    cfg = DemoConfig(workdir=args.workdir, quick=args.quick, data=args.data, data_dir=args.data_dir,
                     teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
                     train_limit=args.train_limit, val_limit=args.val_limit, address=args.address,
                     verbose=args.verbose, teachers=args.teachers)
    cfg.dataset()  # these checks, and run_demo's of the data files, before the cluster starts and the workdir is made
    check_models()
    run_demo(cfg)
    return 0


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("demo", formatter_class=fmt, help="the end-to-end demo on a local cluster",
                       description="Digits (or Fashion-MNIST) shards → teacher (trained once, then reused) → "
                                   "Serve pool → distilled student (2 DDP workers) vs the same student "
                                   "without a teacher → evaluation table and report.json.")
    p.add_argument("--workdir", default="kd-demo", help="where data, models and report go")
    p.add_argument("--data", default="digits",
                   help="digits (scikit-learn's bundled handwritten digits) or fashion-mnist (photographs of "
                        "clothing from Debian's dataset-fashion-mnist, a stratified subset: about 15 min on 2 cores)")
    p.add_argument("--data-dir", help="fashion-mnist: the folder of its IDX files, else /usr/share/datasets/fashion-mnist")
    p.add_argument("--train-limit", type=int, metavar="N", help="fashion-mnist: training images, else the demo's subset")
    p.add_argument("--val-limit", type=int, metavar="N", help="fashion-mnist: val (test) images, else the demo's subset")
    p.add_argument("--teacher-epochs", type=int, help="epochs for the demo teacher")
    p.add_argument("--student-epochs", type=int, help="epochs for each student")
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    p.add_argument("--teachers", type=int, default=1,
                   help="N > 1: N teachers (seeds seed..seed+N-1, one Serve app each) and one more student "
                        "distilled from all of them at once")
    add_address(p)
    add_verbose(p)
    p.set_defaults(func=cmd_demo)
