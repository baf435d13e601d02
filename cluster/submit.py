"""Student runs and the teacher as Ray jobs, through Ray's job submission
API, with the semantics of `ray job submit`.

The working directory (default: the current one) is uploaded as the job's `working_dir`, minus
data, caches, checkpoints and virtual environments (Ray refuses more than 512 MiB and honours
.gitignore; these excludes keep a repository with local shards under that). The entrypoint runs
`python -m cluster.cli ...` inside it, so the code a job runs is the code that was submitted.
`--working-dir local:///abs/path` runs the jobs in a directory every node already has (shared
storage, the image) instead: nothing is uploaded.
Every submission gets a unique id naming its kind and run (`kd-train-<run>-<8 hex>`); a student
run's name must still be unique across runs, since reusing one resumes that run.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Optional

from cluster.auth import ClusterAuthError, cluster_auth

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore syntax; a leading "/" anchors a name to the working dir's root, so the packages'
# own `data/` and `cache/` subpackages are uploaded while a top-level data/ or cache/ folder is not
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", "/data", "/runs", "/cache", "/caches", "/kd-demo",
            "*.tar", "*.parquet", "*.pt", "*.ckpt", "*.safetensors", "checkpoint_*"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_client(address: Optional[str]):
    """A JobSubmissionClient for `address` (else $RAY_ADDRESS if it is an http address, else the
    local dashboard), sending the cluster's token when Ray finds one (cluster.auth); fails naming
    the address when nothing answers there, or what to set when the job server wants a token."""
    from ray.job_submission import JobSubmissionClient

    env = os.environ.get("RAY_ADDRESS", "")
    address = address or (env if env.startswith("http") else DEFAULT_ADDRESS)
    try:
        with cluster_auth(address):  # the client checks the server's version: a refused token fails here
            return JobSubmissionClient(address)
    except ClusterAuthError:
        raise
    except Exception as e:  # connection refused, wrong port: say where we looked
        raise SystemExit(f"kd: no Ray job server at {address} ({e}); pass --address http://<head>:8265 "
                         "(the dashboard port; `ray dashboard CLUSTER.yaml` forwards it)") from e


IN_PLACE = "local://"


def working_dir_path(working_dir: str) -> Path:
    """The directory `working_dir` names: a path here, or the on-node path of a `local://` URI."""
    return Path(working_dir[len(IN_PLACE):]) if working_dir.startswith(IN_PLACE) else Path(working_dir).resolve()


def runtime_env(working_dir: str, env_vars: Optional[dict] = None) -> dict:
    """The job's runtime env: the uploaded working dir without data/caches/checkpoints, or, for
    `local:///abs/path` (a directory every node already has at that path: shared storage, the
    container image), that directory in place, uploaded nowhere."""
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}}
    path = working_dir_path(working_dir)
    if working_dir.startswith(IN_PLACE):
        if not path.is_absolute():
            raise SystemExit(f"kd submit: --working-dir {working_dir!r}: a local:// directory must be absolute "
                             "(local:///shared/project)")
        return {"working_dir": IN_PLACE + str(path), **env}
    if not path.is_dir():
        raise SystemExit(f"kd submit: --working-dir {working_dir!r} is not a directory")
    return {"working_dir": str(path), "excludes": list(EXCLUDES), **env}


def job_path(path: str, working_dir: str) -> str:
    """`path` as the job sees it: relative to the uploaded working dir when inside it, else as given
    (absolute: on storage every node mounts). A relative path outside the working dir is refused."""
    p, wd = Path(path), working_dir_path(working_dir)
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
