"""A real three-node Ray cluster on this machine — a head (with the job server), a "teacher" node
and a "student" node of different CPUs, labels (`kd-role`) and custom resources (`kd_teacher`,
`kd_student`), as cluster/configs/ declares them — driven the way users drive a cluster:

1. `kd submit teacher --role-placement --wait` deploys the teacher pool as a Ray job;
2. two `kd submit train --role-placement` jobs attach to it and are watched until they finish;
3. the GCS actor table tells where every teacher replica and student worker ran.

Prints a JSON report as its last line. Run in its own process (`python tests/multinode_scenario.py
WORKDIR`) because the test session already holds a single-node cluster.
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from cluster.roles import ROLE_LABEL, STUDENT_RESOURCE, TEACHER_RESOURCE

ROOT = Path(__file__).resolve().parents[1]
OBJECT_STORE = 120 * 2**20
APP = "kd-teacher-placement"
TINY = {"embed_dim": 48,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> dict:
    """Free ports for a node's agents: the defaults (e.g. 52365 for the dashboard agent, which job
    submission needs) are taken when another Ray cluster runs on this machine (the test session's)."""
    return {"dashboard_agent_listen_port": free_port(), "metrics_agent_port": free_port(),
            "runtime_env_agent_port": free_port()}


def write_configs(workdir: Path) -> tuple[Path, list[Path]]:
    from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig
    from student_trainer.data.write_shards import write_digits_shards
    from teacher_service.config import ServingConfig, TeacherConfig

    write_digits_shards(workdir / "data", image_size=32, samples_per_shard=64)
    teacher = workdir / "teacher.yaml"
    serving = ServingConfig(app_name=APP, num_replicas=2, num_cpus=0.5, max_batch_size=32, expected_request_samples=16)
    TeacherConfig(model="ViT-B-32", overrides=TINY, torch_threads=1, serving=serving).to_yaml(teacher)
    runs = []
    for name in ("job-a", "job-b"):
        path = workdir / f"{name}.yaml"
        TrainConfig(run_name=name, storage_path=str(workdir / "runs"), model=ModelConfig(name="digits-student"),
                    data=DataConfig(train_shards=str(workdir / "data" / "train-*.tar"), image_size=32, batch_size=16),
                    teacher=TeacherSourceConfig(mode="remote", app_name=APP), losses={"clip": 1.0, "kl": 1.0},
                    optim=OptimConfig(warmup_steps=1), epochs=1, max_steps_per_epoch=2, num_workers=1,
                    cpus_per_worker=1, torch_threads=1, log_every_steps=0).to_yaml(path)
        runs.append(path)
    return teacher, runs


def kd(*argv: str) -> str:
    """Run a `kd` command in this process; its stdout, or RuntimeError with it when it fails."""
    import contextlib
    import io

    from cluster.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"kd {' '.join(argv)} failed:\n{out.getvalue()[-4000:]}")
    return out.getvalue()


def submit(address: str, *flags: str) -> str:
    """`kd submit ...`; returns the submission id it printed. The working dir is used in place
    (`local://`): this cluster's three raylets share one machine and so one runtime-resources
    folder, and Ray 2.60 re-extracts an uploaded working dir there (rmtree, then unzip) whenever
    another raylet first sets it up: a job started earlier then imports from a half-written tree
    (ModuleNotFoundError for a module that exists)."""
    text = kd("submit", *flags, "--address", address, "--working-dir", f"local://{ROOT}", "--python", sys.executable,
              "--role-placement")
    return text.split("submitted ", 1)[1].split(":", 1)[0]


def main(workdir: str) -> None:
    from cluster.submit import job_client, wait_for_job

    work = Path(workdir)
    teacher_yaml, run_yamls = write_configs(work)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "object_store_memory": OBJECT_STORE, "labels": {ROLE_LABEL: "head"},
        "include_dashboard": True, "dashboard_port": free_port(), **agent_ports()})
    nodes = {
        "teacher": cluster.add_node(num_cpus=2, object_store_memory=OBJECT_STORE, labels={ROLE_LABEL: "teacher"},
                                    resources={TEACHER_RESOURCE: 2}, **agent_ports()),
        "student": cluster.add_node(num_cpus=3, object_store_memory=OBJECT_STORE, labels={ROLE_LABEL: "student"},
                                    resources={STUDENT_RESOURCE: 2}, **agent_ports()),
    }
    address = f"http://{cluster.webui_url}"
    try:
        ids = {role: node.node_id for role, node in nodes.items()} | {"head": cluster.head_node.node_id}
        teacher_job = submit(address, "teacher", "--config", str(teacher_yaml), "--wait", "--timeout", "300")
        train_jobs = [submit(address, "train", "--config", str(path)) for path in run_yamls]
        client = job_client(address)
        statuses = {job: wait_for_job(client, job, timeout_s=400) for job in train_jobs}
        logs = {job: client.get_job_logs(job)[-3000:] for job, status in statuses.items() if status != "SUCCEEDED"}
        listed = kd("jobs", "--address", address)
        summary = kd("logs", train_jobs[0], "--address", address)
        ray.init(address=cluster.address, log_to_driver=False)
        from teacher_service.app import collect_stats, get_teacher_handle

        runs = collect_stats(get_teacher_handle(APP))["runs"]
        print(json.dumps({"nodes": ids, "actors": actor_nodes(), "teacher_job": teacher_job, "jobs": statuses,
                          "failed_logs": logs, "kd_jobs": listed, "kd_logs_has_summary": '"run_name": "job-a"' in summary,
                          "teacher_runs": {r: v["samples"] for r, v in runs.items()}}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def actor_nodes() -> list[dict]:
    """Class name and node of every actor the cluster ran (the GCS actor table, dead ones included)."""
    from ray._private.state import actors

    return [{"class": a.get("ActorClassName", ""), "node": a.get("Address", {}).get("NodeID", ""),
             "state": a.get("State")} for a in actors().values()]


if __name__ == "__main__":
    main(sys.argv[1])
