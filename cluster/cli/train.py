"""`kd train` and `kd eval`: a student run on Ray Train, and its metrics."""
from __future__ import annotations

import argparse
import json

from cluster.cli.args import add_address, add_app_names, add_deprecated_alias, add_verbose, weight_arg
from student_trainer.teacher.modes import TeacherMode

# flag → TrainConfig field (dotted for nested configs); a flag left out keeps the config's value
TRAIN_FLAGS = {
    "run_name": "run_name", "storage_path": "storage_path", "epochs": "epochs", "workers": "num_workers",
    "max_steps_per_epoch": "max_steps_per_epoch", "seed": "seed", "train_shards": "data.train_shards",
    "val_shards": "data.val_shards", "batch_size": "data.batch_size", "num_views": "data.num_views",
    "student": "model.name", "teacher_mode": "teacher.mode",
    "cache_path": "teacher.cache_path", "cache_teacher": "teacher.cache_teacher",
    "teacher_patience": "teacher.patience_s",
    "checkpoint_every": "checkpoint_every_steps", "eval_every": "eval_every_steps", "max_failures": "max_failures",
    "inherit_layers": "model.inherit_layers", "selection_score": "selection.score", "selection_k": "selection.k",
}


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig of `kd train`: --config YAML with the flags on top, validated."""
    from student_trainer.config import TrainConfig

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    overrides = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()}
    overrides["use_gpu"] = args.use_gpu or None
    for path, value in overrides.items():
        if value is not None:
            *parents, attr = path.split(".")
            target = cfg
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, attr, value)
    _set_app_names(cfg, args.app_name)
    if args.loss:
        cfg.losses = dict(args.loss)
    if args.allow_teacher_change:
        cfg.teacher.allow_teacher_change = True
    if args.init_from_teacher:
        cfg.model.init_from_teacher = True
    if getattr(args, "role_placement", False):
        from cluster.roles import student_placement

        for name, value in student_placement().items():
            setattr(cfg, name, value)
    return cfg.validate()


def _set_app_names(cfg, apps: list[str] | None) -> None:
    """One --app-name: the teacher's app, as before. Several: one teacher per app (named by it, the
    other fields the config's), replacing the config's teacher.sources."""
    if not apps:
        return
    if len(apps) == 1:
        cfg.teacher.app_name = apps[0]
        return
    if not cfg.teacher.mode.gives_outputs:
        cfg.teacher.mode = TeacherMode.REMOTE
    cfg.teacher.sources = [{"name": app, "app_name": app} for app in apps]


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.local import init_ray
    from student_trainer.preflight import check_run
    from student_trainer.train import run_training

    cfg = train_config_from_args(args)
    check_run(cfg)  # what can be checked without Ray fails here, before a cluster starts
    print(init_ray(args.address, verbose=args.verbose))
    result = run_training(cfg, verbose=args.verbose)
    print(json.dumps({"run_name": cfg.run_name, "checkpoint": result.checkpoint.path
                      if result.checkpoint else None, "metrics": result.metrics}, indent=2,
                     default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from student_trainer.evaluate import evaluate_checkpoint, evaluate_teacher

    if bool(args.checkpoint) == bool(args.teacher_config):
        raise ValueError("kd eval: give exactly one of --checkpoint or --teacher-config")
    if args.checkpoint:
        from student_trainer.checkpoint import read_provenance

        from student_trainer.events import log_checkpoint_eval

        metrics = evaluate_checkpoint(args.checkpoint, args.shards, limit=args.limit)
        metrics["provenance"] = read_provenance(args.checkpoint)  # the teacher and losses it was distilled with
        metrics["tensorboard"] = log_checkpoint_eval(args.checkpoint, metrics)  # a run's checkpoint: eval/* curves
    else:
        from teacher_service.config import TeacherConfig

        metrics = evaluate_teacher(TeacherConfig.from_yaml(args.teacher_config), args.shards,
                                   limit=args.limit)
    print(json.dumps(metrics, indent=2))
    return 0


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("train", formatter_class=fmt, help="train a student with Ray Train",
                       description="Train (or resume: same --run-name and --storage-path) a student "
                                   "with a Ray Train TorchTrainer. Flags override the YAML config.")
    p.add_argument("--config", help="TrainConfig YAML")
    p.add_argument("--run-name", help="unique run name; reusing one resumes it")
    p.add_argument("--storage-path", help="where checkpoints go (shared storage on a cluster)")
    p.add_argument("--train-shards", help="shard dir, glob or brace pattern")
    p.add_argument("--val-shards", help="shard dir, glob or brace pattern")
    p.add_argument("--student", help="open_clip architecture or preset (digits-student)")
    p.add_argument("--init-from-teacher", action="store_true",
                   help="start a fresh run from the teacher's weights, blocks taken and widths sliced "
                        "(TinyCLIP weight inheritance); remote runs also need the teacher's config "
                        "(teacher.teacher in --config), cache runs read it from the cache")
    p.add_argument("--inherit-layers", choices=["interval", "first"],
                   help="teacher blocks an inheriting student takes: every n/k-th (interval, default) or the first k")
    p.add_argument("--teacher-mode", choices=TeacherMode.values(),
                   help="teacher source")
    add_app_names(p, "teacher Serve app for remote/hybrid mode")
    p.add_argument("--cache-path", help="embedding cache directory for cache/hybrid mode")
    p.add_argument("--cache-teacher", metavar="FINGERPRINT|MODEL",
                   help="cache mode: which teacher's rows of a cache holding several (see `kd cache info`)")
    p.add_argument("--num-views", type=int,
                   help="views per sample: epoch e trains on view e %% N (reuse precomputed views)")
    p.add_argument("--selection-score", metavar="SCORE",  # the config refuses other names, listing them
                   help="data selection: train on the best 1/K of each super-batch by the teacher's per-sample "
                        "loss (teacher_loss), the student's minus the teacher's (learnability), or on its first "
                        "rows (uniform, the control)")
    p.add_argument("--selection-k", type=int, metavar="K",
                   help="data selection: each step draws K × --batch-size samples per worker and trains on "
                        "--batch-size of them (an epoch has K times fewer steps); 1: no selection")
    p.add_argument("--loss", type=weight_arg, action="append",
                   help="NAME[=WEIGHT], repeatable, e.g. --loss clip --loss kl=1 --loss fd=2000")
    p.add_argument("--epochs", type=int, help="epochs")
    p.add_argument("--max-steps-per-epoch", type=int, metavar="STEPS", help="cap on optimizer steps per epoch")
    add_deprecated_alias(p, "--max-steps", "--max-steps-per-epoch", type=int)
    p.add_argument("--workers", type=int, help="DDP workers")
    p.add_argument("--batch-size", type=int, help="per-worker batch size")
    p.add_argument("--seed", type=int, help="seed")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl, AMP)")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps inside an epoch (default: epoch ends only)")
    p.add_argument("--eval-every", type=int, metavar="STEPS",
                   help="evaluate the student on --val-shards every STEPS optimizer steps and after the last "
                        "(zero-shot top-1/5, retrieval R@1): eval_curve.json in the run folder, eval/* in "
                        "TensorBoard, one console line each (default: no evaluation while training)")
    p.add_argument("--max-failures", type=int,
                   help="worker-group restarts from the last checkpoint after a worker dies (-1: unlimited)")
    p.add_argument("--teacher-patience", type=float, metavar="SECONDS",
                   help="how long to wait for a teacher that stopped answering before the run "
                        "checkpoints and stops (rerun resumes)")
    p.add_argument("--role-placement", action="store_true",
                   help="run workers only on student nodes (label kd-role=student, resource kd_student)")
    p.add_argument("--allow-teacher-change", action="store_true",
                   help="resume a run's checkpoint with another teacher than the one it was distilled from "
                        "(refused otherwise, naming both fingerprints)")
    add_address(p)
    add_verbose(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", formatter_class=fmt, help="zero-shot and retrieval metrics",
                       description="Zero-shot top-1/top-5 (class-name prompts) and image<->text "
                                   "retrieval R@1/5/10 on val shards, for a student checkpoint (with the "
                                   "provenance it records: teacher fingerprint, model, mode, losses) or a "
                                   "teacher config.")
    p.add_argument("--shards", required=True, help="val shard dir, glob or brace pattern")
    p.add_argument("--checkpoint", help="student checkpoint directory (model.pt + model_config.json)")
    p.add_argument("--teacher-config", help="TeacherConfig YAML")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.set_defaults(func=cmd_eval)
