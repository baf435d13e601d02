"""Placement on a real multi-node Ray cluster started on this machine: teacher replicas only on the
teacher node, student workers only on the student node (tests/multinode_scenario.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.roles import student_placement, teacher_placement
from student_trainer.config import TrainConfig
from student_trainer.train import worker_resources
from teacher_service.config import ServingConfig

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def run_scenario(script: str, workdir: Path) -> dict:
    """Run tests/<script> in its own process (it starts its own cluster); its JSON report."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script), str(workdir)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_jobs_submitted_to_a_multi_node_cluster_land_on_their_own_nodes(tmp_path):
    """`kd submit teacher`, then two `kd submit train` jobs attached to it, on head + teacher +
    student nodes: both jobs succeed, replicas ran only on the teacher node, workers only on the
    student node, and the teacher answered both runs."""
    report = run_scenario("multinode_scenario.py", tmp_path)
    nodes, actors = report["nodes"], report["actors"]
    replicas = [a for a in actors if a["class"].startswith("ServeReplica:kd-teacher-placement")]
    workers = [a for a in actors if a["class"] == "RayTrainWorker"]
    assert set(report["jobs"].values()) == {"SUCCEEDED"}, report["failed_logs"]
    assert report["teacher_job"].startswith("kd-teacher-") and all(j.startswith("kd-train-job-") for j in report["jobs"])
    for job in [report["teacher_job"], *report["jobs"]]:  # `kd jobs` lists every submission as finished
        assert any(line.startswith(job) and "SUCCEEDED" in line for line in report["kd_jobs"].splitlines()), job
    assert report["kd_logs_has_summary"]  # `kd logs ID` prints the driver's output (kd train's summary)
    assert len(replicas) == 2 and len(workers) == 2, actors
    assert {a["node"] for a in replicas} == {nodes["teacher"]}, (nodes, replicas)
    assert {a["node"] for a in workers} == {nodes["student"]}, (nodes, workers)
    assert report["teacher_runs"].get("job-a", 0) > 0 and report["teacher_runs"].get("job-b", 0) > 0


def test_placement_reaches_serve_and_train_options():
    opts = ServingConfig(**teacher_placement()).serve_options()["ray_actor_options"]
    assert opts["label_selector"] == {"kd-role": "teacher"} and opts["resources"] == {"kd_teacher": 1}
    cfg = TrainConfig(**student_placement(), use_gpu=True)
    assert worker_resources(cfg) == {"CPU": 1.0, "kd_student": 1, "GPU": 1}
    shared = TrainConfig(**student_placement(), use_gpu=True, gpus_per_worker=0.5)
    assert worker_resources(shared)["GPU"] == 0.5  # a student beside a teacher replica on one card
    assert "GPU" not in worker_resources(TrainConfig(gpus_per_worker=0.5))  # no GPU without use_gpu
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="gpus_per_worker"):
            TrainConfig(gpus_per_worker=bad).validate()
    with pytest.raises(ValueError, match="serving.resources: 'GPU' has its own field"):
        ServingConfig(resources={"GPU": 1})
    with pytest.raises(ValueError, match="worker_label_selector: expected a mapping"):
        TrainConfig(worker_label_selector={"kd-role": 1}).validate()


def test_autoscaler_adds_a_student_node_on_demand_and_removes_it_when_idle(tmp_path):
    """Ray's fake multi-node provider (tests/autoscale_scenario.py): a student run asking for
    kd_student, which no node has, makes the autoscaler add a student node; idle, it goes away."""
    report = run_scenario("autoscale_scenario.py", tmp_path)
    assert "error" not in report, report
    counts = [n for _, n in report["timeline"]]
    assert counts[0] == 1 and max(counts) == 2 and counts[-1] == 1, report  # head, + student node, head again
    up = next(t for t, n in report["timeline"] if n == 2)
    down = next(t for t, n in report["timeline"] if n == 1 and t > up)
    assert up < report["train_finished_s"] < down and report["steps"] == 2
    print(f"autoscaler: student node up at {up} s, run done at {report['train_finished_s']} s, node gone at {down} s")
