"""`kd submit teacher|train`, `kd jobs`, `kd logs`: runs as Ray jobs through Ray's job submission
API, with the semantics of `ray job submit`.

The working directory (default: the current one) is uploaded as the job's `working_dir`, minus
data, caches, checkpoints and virtual environments (Ray refuses more than 512 MiB and honours
.gitignore; these excludes keep a repository with local shards under that). The entrypoint runs
`python -m cluster.cli ...` inside it, so the code a job runs is the code that was submitted.
Every submission gets a unique id naming its kind and run (`kd-train-<run>-<8 hex>`); a student
run's name must still be unique across runs, since reusing one resumes that run.
"""
from __future__ import annotations

import argparse
import os
import shlex
import time
import uuid
from pathlib import Path
from typing import Optional

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", "data", "runs", "cache", "caches", "kd-demo",
            "*.tar", "*.parquet", "*.pt", "*.ckpt", "*.safetensors", "checkpoint_*"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_client(address: Optional[str]):
    """A JobSubmissionClient for `address` (else $RAY_ADDRESS if it is an http address, else the
    local dashboard); fails naming the address when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    env = os.environ.get("RAY_ADDRESS", "")
    address = address or (env if env.startswith("http") else DEFAULT_ADDRESS)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, wrong port: say where we looked
        raise SystemExit(f"kd: no Ray job server at {address} ({e}); pass --address http://<head>:8265 "
                         "(the dashboard port; `ray dashboard CLUSTER.yaml` forwards it)") from e


def runtime_env(working_dir: str, env_vars: Optional[dict] = None) -> dict:
    """The job's runtime env: the uploaded working dir without data/caches/checkpoints."""
    path = Path(working_dir).resolve()
    if not path.is_dir():
        raise SystemExit(f"kd submit: --working-dir {working_dir!r} is not a directory")
    return {"working_dir": str(path), "excludes": list(EXCLUDES),
            "env_vars": {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}}


def job_path(path: str, working_dir: str) -> str:
    """`path` as the job sees it: relative to the uploaded working dir when inside it, else as given
    (absolute: on storage every node mounts). A relative path outside the working dir is refused."""
    p, wd = Path(path), Path(working_dir).resolve()
    if not p.exists():
        raise SystemExit(f"kd submit: {path!r} does not exist here")
    resolved = p.resolve()
    if resolved.is_relative_to(wd):
        return resolved.relative_to(wd).as_posix()
    if p.is_absolute():
        return str(p)  # must be on shared storage that the cluster's nodes mount at the same path
    raise SystemExit(f"kd submit: {path!r} is outside --working-dir {str(wd)!r}, so the job would not "
                     "have it; move it inside, or give an absolute path on shared storage")


def submission_id(kind: str, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64]
    return f"kd-{kind}-{safe}-{uuid.uuid4().hex[:8]}"


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


def submit_job(client, patience_s: float = 60.0, **job) -> str:
    """`client.submit_job(**job)`, retried while the job server answers "No available agent" (a
    cluster that has just started: its job agents register a few seconds after the dashboard)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def wait_for_job(client, job_id: str, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> str:
    """Poll until the job ends (or `timeout_s` passes: TimeoutError naming the job and its status)."""
    start = time.monotonic()
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


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


def add_submit_commands(sub, fmt) -> None:
    address_help = f"job server (dashboard) address, default $RAY_ADDRESS if http, else {DEFAULT_ADDRESS}"
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
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working_dir")
    p.add_argument("--python", default="python", help="the Python interpreter on the cluster that has the "
                                                      "dependencies installed")
    p.add_argument("--submission-id", help="job id (default: kd-<kind>-<name>-<8 hex>, unique)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end, print its logs, exit 1 unless it succeeded")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("--address", help=address_help)
    p.add_argument("--train-args", default="", metavar="FLAGS",
                   help="train: further `kd train` flags, quoted, e.g. --train-args '--epochs 2 --teacher-mode remote'")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", formatter_class=fmt, help="list Ray jobs and their status",
                       description="Every job the cluster's job server knows: id, status, start, entrypoint.")
    p.add_argument("--address", help=address_help)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("logs", formatter_class=fmt, help="print (or follow) a Ray job's logs",
                       description="The driver logs of one job, by submission id.")
    p.add_argument("job_id", help="submission id (kd jobs lists them)")
    p.add_argument("--follow", action="store_true", help="stream new lines until the job ends")
    p.add_argument("--address", help=address_help)
    p.set_defaults(func=cmd_logs)
