"""The `kd` command: data, teacher serving, training, evaluation and the end-to-end demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

RAY_ADDRESS_HELP = ("Ray cluster address (e.g. 'auto' or ray://host:10001). Default: $RAY_ADDRESS, "
                    "else an embedded local cluster that lives as long as this command")


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _weight_arg(text: str) -> tuple[str, float]:
    name, sep, weight = text.partition("=")
    try:
        return name.strip(), float(weight) if sep else 1.0
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--loss {text!r}: expected NAME or NAME=WEIGHT") from exc


# ---------------------------------------------------------------------------------------------- data
def cmd_data_digits(args: argparse.Namespace) -> int:
    from student_trainer.datasets import write_digits_shards

    summaries = write_digits_shards(args.out, seed=args.seed, image_size=args.image_size,
                                    val_fraction=args.val_fraction,
                                    samples_per_shard=args.samples_per_shard,
                                    image_format=args.image_format)
    for split, s in summaries.items():
        print(f"{split}: {s.samples} samples in {len(s.shards)} shards under {args.out}")
    return 0


def cmd_data_folder(args: argparse.Namespace) -> int:
    from student_trainer.datasets import write_folder_shards

    s = write_folder_shards(args.images, args.captions, args.out, split=args.split,
                            max_shard_samples=args.max_shard_samples,
                            max_shard_bytes=args.max_shard_mb * 2**20)
    print(f"{s.split}: wrote {s.samples} samples in {len(s.shards)} shards under {args.out}")
    skipped = sum(s.skipped.values())
    print(f"skipped {skipped}" + (": " + ", ".join(f"{k}={v}" for k, v in sorted(s.skipped.items()))
                                  if skipped else ""))
    return 0


# ------------------------------------------------------------------------------------------- teacher
def teacher_config_from_args(args: argparse.Namespace):
    from teacher_service.config import TeacherConfig

    cfg = TeacherConfig.from_yaml(args.config) if getattr(args, "config", None) else TeacherConfig()
    updates = {k: v for k, v in {
        "model": args.model, "pretrained": args.pretrained, "overrides": args.overrides,
        "app_name": args.app_name, "num_replicas": args.replicas, "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus, "max_batch_size": args.max_batch_size,
        "precision": args.precision, "autoscaling": getattr(args, "autoscale", None),
        "grpc_port": getattr(args, "grpc_port", None), "grpc_host": getattr(args, "grpc_host", None),
        "grpc_token_file": getattr(args, "grpc_token_file", None),
    }.items() if v is not None}
    if args.replicas is not None and getattr(args, "autoscale", None) is None:
        updates["autoscaling"] = None  # --replicas asks for a fixed pool, also over a config that autoscales
    if getattr(args, "role_placement", False):
        from .roles import teacher_placement

        updates.update(teacher_placement())
    return TeacherConfig.from_dict({**cfg.to_dict(), **updates})


def cmd_teacher_serve(args: argparse.Namespace) -> int:
    from teacher_service.deployment import delete_teacher, deploy

    from .local import init_ray

    cfg = teacher_config_from_args(args)
    print(init_ray(args.address))
    handle = deploy(cfg)  # with grpc_port: also the app's gRPC ingress, on this node
    info = handle.info.remote().result(timeout_s=600)
    print(f"teacher app {cfg.app_name!r} is serving {info.get('model')} "
          f"(embed_dim {info.get('embed_dim')}, fingerprint {info.get('fingerprint')})")
    if cfg.grpc_port is not None:
        print(grpc_banner(cfg))
    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    if args.block or embedded:
        if embedded:
            print("the embedded cluster lives only as long as this command: keeping it up. "
                  "To deploy and return, start a cluster (`ray start --head`) and pass --address auto")
        print("serving; Ctrl-C stops this command and the app with it")
        try:
            import time
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            delete_teacher(cfg.app_name)
    return 0


def grpc_banner(cfg) -> str:
    """Where the gRPC ingress listens and who can reach it."""
    from teacher_service.grpc_server import ingress_address

    reach = "this machine only" if cfg.grpc_is_loopback() else "every host that can reach this address"
    token = "bearer token required" if cfg.grpc_token_file else "no token required"
    return (f"gRPC: TeacherService (Embed/Stats/Health) on {ingress_address(cfg.app_name)} ({reach}; {token}); "
            f"per caller at most {cfg.grpc_caller_max_in_flight or 'unlimited'} in flight, "
            f"{cfg.grpc_caller_samples_per_s or 'unlimited'} samples/s")


def cmd_teacher_status(args: argparse.Namespace) -> int:
    from teacher_service.deployment import collect_stats, get_teacher_handle
    from teacher_service.stats import format_stats

    from .local import init_ray

    init_ray(args.address or "auto", quiet=True)
    handle = get_teacher_handle(args.app_name, timeout_s=30)
    info = handle.info.remote().result(timeout_s=args.timeout)
    stats = collect_stats(handle, timeout_s=args.timeout)  # every replica, merged
    print(json.dumps({"info": info, "stats": stats}, indent=2, default=str) if args.json
          else format_stats(info, stats))
    return 0


def cmd_teacher_stop(args: argparse.Namespace) -> int:
    from teacher_service.deployment import delete_teacher

    from .local import init_ray

    init_ray(args.address or "auto", quiet=True)
    delete_teacher(args.app_name)
    print(f"deleted teacher app {args.app_name!r} (and its gRPC ingress)")
    return 0


# --------------------------------------------------------------------------------------------- train
def train_config_from_args(args: argparse.Namespace):
    from student_trainer.config import TrainConfig

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    overrides = {
        "run_name": args.run_name, "storage_path": args.storage_path, "epochs": args.epochs,
        "num_workers": args.workers, "max_steps_per_epoch": args.max_steps, "seed": args.seed,
        "use_gpu": args.use_gpu or None, "data.train_shards": args.train_shards,
        "data.val_shards": args.val_shards, "data.batch_size": args.batch_size,
        "data.num_views": args.num_views, "model.name": args.student, "teacher.mode": args.teacher_mode,
        "teacher.app_name": args.app_name, "teacher.cache_path": args.cache_path,
        "teacher.patience_s": args.teacher_patience, "checkpoint_every_steps": args.checkpoint_every,
        "max_failures": args.max_failures,
    }
    for path, value in overrides.items():
        if value is not None:
            *parents, attr = path.split(".")
            target = cfg
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, attr, value)
    if args.loss:
        cfg.losses = dict(args.loss)
    if getattr(args, "role_placement", False):
        from .roles import student_placement

        for name, value in student_placement().items():
            setattr(cfg, name, value)
    return cfg.validate()


def cmd_train(args: argparse.Namespace) -> int:
    from student_trainer.train import run_training

    from .local import init_ray

    cfg = train_config_from_args(args)
    print(init_ray(args.address))
    result = run_training(cfg)
    print(json.dumps({"run_name": cfg.run_name, "checkpoint": result.checkpoint.path
                      if result.checkpoint else None, "metrics": result.metrics}, indent=2,
                     default=str))
    return 0


# ---------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from student_trainer.evaluate import evaluate_checkpoint, evaluate_teacher

    if bool(args.checkpoint) == bool(args.teacher_config):
        raise SystemExit("kd eval: give exactly one of --checkpoint or --teacher-config")
    if args.checkpoint:
        metrics = evaluate_checkpoint(args.checkpoint, args.shards, limit=args.limit)
    else:
        from teacher_service.config import TeacherConfig

        metrics = evaluate_teacher(TeacherConfig.from_yaml(args.teacher_config), args.shards,
                                   limit=args.limit)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(workdir=args.workdir, quick=args.quick, teacher_epochs=args.teacher_epochs,
                     student_epochs=args.student_epochs, address=args.address)
    run_demo(cfg)
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="kd", formatter_class=fmt,
        description="CLIP knowledge distillation on Ray: a frozen open_clip teacher served by Ray Serve "
                    "feeds students trained with Ray Train.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="write WebDataset shards", formatter_class=fmt,
                          description="Write WebDataset shards (jpg/png, txt caption, cls, json).")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    p = data_sub.add_parser("digits", formatter_class=fmt,
                            help="train/val shards from scikit-learn's bundled handwritten digits",
                            description="Deterministic train/val shards from scikit-learn's bundled "
                                        "8x8 digits, upscaled to RGB, with templated captions.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="split and caption seed")
    p.add_argument("--image-size", type=int, default=32, help="side of the stored RGB images")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction held out for val")
    p.add_argument("--samples-per-shard", type=int, default=200, help="samples per tar shard")
    p.add_argument("--image-format", choices=["png", "jpg"], default="png", help="image member type")
    p.set_defaults(func=cmd_data_digits)
    p = data_sub.add_parser("folder", formatter_class=fmt,
                            help="shards from your own images and a captions file",
                            description="Shards from an image folder and a CSV/TSV/JSONL captions "
                                        "file (columns image, caption[, label]). Unreadable images "
                                        "and missing captions are skipped and counted.")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--captions", required=True, help="captions file: .csv, .tsv or .jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="train", help="shard name prefix (train, val, ...)")
    p.add_argument("--max-shard-samples", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max-shard-mb", type=int, default=256, help="shard size limit in MiB")
    p.set_defaults(func=cmd_data_folder)

    teacher = sub.add_parser("teacher", help="deploy and inspect the teacher pool (Ray Serve)",
                             formatter_class=fmt)
    t_sub = teacher.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    p = t_sub.add_parser("serve", formatter_class=fmt, help="deploy the teacher as a named Serve app",
                         description="Deploy a frozen open_clip teacher as a named, detached Serve "
                                     "app that student runs attach to by name. Use --address to "
                                     "deploy into a running cluster (e.g. after `ray start --head`).")
    p.add_argument("--config", help="TeacherConfig YAML (flags below override it)")
    p.add_argument("--model", help="open_clip architecture, e.g. ViT-L-14")
    p.add_argument("--pretrained", help="open_clip pretrained tag or local checkpoint path")
    p.add_argument("--overrides", type=_json_arg, help="JSON of open_clip create_model overrides")
    p.add_argument("--app-name", help="Serve application name (default kd-teacher)")
    p.add_argument("--replicas", type=int, help="number of replicas (a fixed pool)")
    p.add_argument("--autoscale", type=_json_arg, metavar="JSON",
                   help='autoscale the pool instead: Serve autoscaling_config as JSON, max_replicas required, '
                        'e.g. \'{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}\'')
    p.add_argument("--num-cpus", type=float, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, help="GPUs per replica")
    p.add_argument("--max-batch-size", type=int, help="samples per teacher forward")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="teacher precision")
    p.add_argument("--role-placement", action="store_true",
                   help="run replicas only on teacher nodes (label kd-role=teacher, resource kd_teacher)")
    p.add_argument("--grpc-port", type=int,
                   help="also serve gRPC (Embed/Stats/Health) for clients outside Ray on this port "
                        "(0: a free port, printed); the ingress runs on this node and stops with the app")
    p.add_argument("--grpc-host",
                   help="address the gRPC ingress binds (default 127.0.0.1: this machine only; "
                        "0.0.0.0 or :: for every interface, then also set --grpc-token-file)")
    p.add_argument("--grpc-token-file",
                   help="owner-only (chmod 600) file with the bearer token gRPC callers must send")
    p.add_argument("--address", help=RAY_ADDRESS_HELP)
    p.add_argument("--block", action="store_true",
                   help="keep this command running (always so with an embedded cluster)")
    p.set_defaults(func=cmd_teacher_serve)
    for name, func, text in [("status", cmd_teacher_status, "print the teacher's info and counters"),
                             ("stop", cmd_teacher_stop, "delete the teacher app and its gRPC ingress")]:
        p = t_sub.add_parser(name, formatter_class=fmt, help=text, description=text)
        p.add_argument("--app-name", default="kd-teacher", help="Serve application name")
        p.add_argument("--address", help="Ray cluster address (default: auto)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the merged counters as JSON")
            p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the replicas")
        p.set_defaults(func=func)

    p = sub.add_parser("train", formatter_class=fmt, help="train a student with Ray Train",
                       description="Train (or resume: same --run-name and --storage-path) a student "
                                   "with a Ray Train TorchTrainer. Flags override the YAML config.")
    p.add_argument("--config", help="TrainConfig YAML")
    p.add_argument("--run-name", help="unique run name; reusing one resumes it")
    p.add_argument("--storage-path", help="where checkpoints go (shared storage on a cluster)")
    p.add_argument("--train-shards", help="shard dir, glob or brace pattern")
    p.add_argument("--val-shards", help="shard dir, glob or brace pattern")
    p.add_argument("--student", help="open_clip architecture or preset (digits-student)")
    p.add_argument("--teacher-mode", choices=["none", "inline", "remote", "cache", "hybrid"],
                   help="teacher source")
    p.add_argument("--app-name", help="teacher Serve app for remote/hybrid mode")
    p.add_argument("--cache-path", help="embedding cache directory for cache/hybrid mode")
    p.add_argument("--num-views", type=int,
                   help="views per sample: epoch e trains on view e %% N (reuse precomputed views)")
    p.add_argument("--loss", type=_weight_arg, action="append",
                   help="NAME[=WEIGHT], repeatable, e.g. --loss clip --loss kl=1 --loss fd=2000")
    p.add_argument("--epochs", type=int, help="epochs")
    p.add_argument("--max-steps", type=int, help="cap on steps per epoch")
    p.add_argument("--workers", type=int, help="DDP workers")
    p.add_argument("--batch-size", type=int, help="per-worker batch size")
    p.add_argument("--seed", type=int, help="seed")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl, AMP)")
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps inside an epoch (default: epoch ends only)")
    p.add_argument("--max-failures", type=int,
                   help="worker-group restarts from the last checkpoint after a worker dies (-1: unlimited)")
    p.add_argument("--teacher-patience", type=float, metavar="SECONDS",
                   help="how long to wait for a teacher that stopped answering before the run "
                        "checkpoints and stops (rerun resumes)")
    p.add_argument("--role-placement", action="store_true",
                   help="run workers only on student nodes (label kd-role=student, resource kd_student)")
    p.add_argument("--address", help=RAY_ADDRESS_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", formatter_class=fmt, help="zero-shot and retrieval metrics",
                       description="Zero-shot top-1/top-5 (class-name prompts) and image<->text "
                                   "retrieval R@1/5/10 on val shards, for a student checkpoint or a "
                                   "teacher config.")
    p.add_argument("--shards", required=True, help="val shard dir, glob or brace pattern")
    p.add_argument("--checkpoint", help="student checkpoint directory (model.pt + model_config.json)")
    p.add_argument("--teacher-config", help="TeacherConfig YAML")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", formatter_class=fmt, help="the end-to-end demo on a local cluster",
                       description="Digits shards → teacher (trained once, then reused) → Serve "
                                   "pool → distilled student (2 DDP workers) vs the same student "
                                   "without a teacher → evaluation table and report.json.")
    p.add_argument("--workdir", default="kd-demo", help="where data, models and report go")
    p.add_argument("--teacher-epochs", type=int, help="epochs for the demo teacher")
    p.add_argument("--student-epochs", type=int, help="epochs for each student")
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    p.add_argument("--address", help=RAY_ADDRESS_HELP)
    p.set_defaults(func=cmd_demo)

    from .sweep import add_sweep_command

    add_sweep_command(sub, fmt)

    from .cli_cache import add_cache_commands

    add_cache_commands(sub, fmt)

    from .submit import add_submit_commands

    add_submit_commands(sub, fmt)

    from .bench.cli import add_bench_command

    add_bench_command(sub, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
