"""`kd submit teacher|train`, `kd jobs`, `kd logs`: runs as Ray jobs (`cluster.submit` talks to the job server)."""
from __future__ import annotations

import argparse
import shlex
import time

from cluster.cli.args import add_address
from cluster.submit import job_client, job_path, runtime_env, submission_id, submit_job, wait_for_job


def teacher_entrypoint(args: argparse.Namespace) -> tuple[str, str]:
    cmd = [args.python, "-m", "cluster.cli", "teacher", "serve", "--address", "auto",
           "--config", job_path(args.config, args.working_dir)]
    if args.role_placement:
        cmd.append("--role-placement")
    if args.app_name:
        cmd += ["--app-name", args.app_name]
    return shlex.join(cmd), args.app_name or "kd-teacher"


def train_entrypoint(args: argparse.Namespace) -> tuple[str, str]:
    from student_trainer.config import TrainConfig

    cfg = TrainConfig.from_yaml(args.config)
    run = args.run_name or cfg.run_name
    cmd = [args.python, "-m", "cluster.cli", "train", "--address", "auto",
           "--config", job_path(args.config, args.working_dir), "--run-name", run]
    if args.role_placement:
        cmd.append("--role-placement")
    return shlex.join(cmd + shlex.split(args.train_args or "")), run


def cmd_submit(args: argparse.Namespace) -> int:
    entrypoint, name = (teacher_entrypoint if args.kind == "teacher" else train_entrypoint)(args)
    client = job_client(args.address)
    job_id = submit_job(client, entrypoint=entrypoint,
                        submission_id=args.submission_id or submission_id(args.kind, name),
                        runtime_env=runtime_env(args.working_dir), metadata={"kd_kind": args.kind, "kd_name": name})
    print(f"submitted {job_id}: {entrypoint}")
    if not args.wait:
        print(f"follow it with: kd logs {job_id} --follow   (status: kd jobs)")
        return 0
    status = wait_for_job(client, job_id, args.timeout)
    print(client.get_job_logs(job_id), end="")
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = sorted(job_client(args.address).list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'submission id':44} {'status':10} {'started':19} entrypoint")
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
        status = str(job.status).split(".")[-1]
        print(f"{job.submission_id or job.job_id or '-':44} {status:10} {started:19} {job.entrypoint[:80]}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = job_client(args.address)
    if not args.follow:
        print(client.get_job_logs(args.job_id), end="")
        return 0
    import asyncio

    async def follow() -> None:
        async for lines in client.tail_job_logs(args.job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    return 0


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("submit", formatter_class=fmt, help="submit the teacher or a student run as a Ray job",
                       description="Submit through Ray's job submission API (like `ray job submit`): the "
                                   "working dir is uploaded without data, caches and checkpoints, and the "
                                   "job runs `kd teacher serve` or `kd train` on the cluster.")
    p.add_argument("kind", choices=["teacher", "train"], help="what to run")
    p.add_argument("--config", required=True, help="TeacherConfig YAML (teacher) or TrainConfig YAML (train), "
                                                   "inside --working-dir or an absolute path on shared storage")
    p.add_argument("--run-name", help="train: unique run name (default: the config's)")
    p.add_argument("--app-name", help="teacher: Serve application name (default: the config's)")
    p.add_argument("--role-placement", action="store_true",
                   help="teacher replicas only on kd-role=teacher nodes, student workers only on kd-role=student")
    p.add_argument("--working-dir", default=".",
                   help="directory uploaded as the job's working_dir, or local:///abs/path: a directory every "
                        "node already has at that path (shared storage, the image), used in place")
    p.add_argument("--python", default="python", help="the Python interpreter on the cluster that has the "
                                                      "dependencies installed")
    p.add_argument("--submission-id", help="job id (default: kd-<kind>-<name>-<8 hex>, unique)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end, print its logs, exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    add_address(p, "jobs")
    p.add_argument("--train-args", default="", metavar="FLAGS",
                   help="train: further `kd train` flags, quoted, e.g. --train-args '--epochs 2 --teacher-mode remote'")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", formatter_class=fmt, help="list Ray jobs and their status",
                       description="Every job the cluster's job server knows: id, status, start, entrypoint.")
    add_address(p, "jobs")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("logs", formatter_class=fmt, help="print (or follow) a Ray job's logs",
                       description="The driver logs of one job, by submission id.")
    p.add_argument("job_id", help="submission id (kd jobs lists them)")
    p.add_argument("--follow", action="store_true", help="stream new lines until the job ends")
    add_address(p, "jobs")
    p.set_defaults(func=cmd_logs)

