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
from teacher_service.config import TeacherConfig

pytestmark = pytest.mark.ray
SCENARIO = Path(__file__).with_name("multinode_scenario.py")


def test_jobs_submitted_to_a_multi_node_cluster_land_on_their_own_nodes(tmp_path):
    """`kd submit teacher`, then two `kd submit train` jobs attached to it, on head + teacher +
    student nodes: both jobs succeed, replicas ran only on the teacher node, workers only on the
    student node, and the teacher answered both runs."""
    proc = subprocess.run([sys.executable, str(SCENARIO), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
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
    opts = TeacherConfig(**teacher_placement()).serve_options()["ray_actor_options"]
    assert opts["label_selector"] == {"kd-role": "teacher"} and opts["resources"] == {"kd_teacher": 1}
    cfg = TrainConfig(**student_placement(), use_gpu=True)
    assert worker_resources(cfg) == {"CPU": 1.0, "kd_student": 1, "GPU": 1}
    with pytest.raises(ValueError, match="resources: 'GPU' has its own field"):
        TeacherConfig(resources={"GPU": 1})
    with pytest.raises(ValueError, match="worker_label_selector: expected a mapping"):
        TrainConfig(worker_label_selector={"kd-role": 1}).validate()
