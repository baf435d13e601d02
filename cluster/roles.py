"""Node roles on a heterogeneous cluster: which nodes run the teacher pool and which run students.

GPUs alone cannot keep the two apart (teacher nodes have GPUs too), so every node declares its role
twice, as the label `kd-role` and as a custom resource only nodes of that role have. Teacher
replicas and student workers ask for both (`teacher_placement`, `student_placement`); the cluster
launcher and KubeRay configs under `cluster/configs/` declare the same names (a test checks it).
"""
from __future__ import annotations

ROLE_LABEL = "kd-role"
TEACHER_ROLE = "teacher"
STUDENT_ROLE = "student"
TEACHER_RESOURCE = "kd_teacher"
STUDENT_RESOURCE = "kd_student"
# Kubernetes: the node that hosts the teacher's gRPC ingress (cluster/configs/kuberay/teacher-grpc.yaml).
# The job that deploys the teacher asks for this resource, so its driver, and with it the ingress
# (pinned to the driver's node), runs there.
GRPC_ROLE = "grpc"
GRPC_RESOURCE = "kd_grpc"


def teacher_placement() -> dict:
    """`ServingConfig` fields (TeacherConfig.serving) that keep replicas on teacher nodes."""
    return {"label_selector": {ROLE_LABEL: TEACHER_ROLE}, "resources": {TEACHER_RESOURCE: 1}}


def student_placement() -> dict:
    """TrainConfig fields that keep student workers on student nodes."""
    return {"worker_label_selector": {ROLE_LABEL: STUDENT_ROLE}, "worker_resources": {STUDENT_RESOURCE: 1}}
