"""A bounded soak on the shared local cluster (loopback only): 3 students (RemoteTeacher in Ray
actors) and 6 gRPC threads under one caller limited to 4 in flight, against one tiny teacher
replica for 20 s. `pytest -s` prints the report; `benchmarks/soak.py --duration 600` runs the
same code for longer."""
from __future__ import annotations

import pytest
from tiny_models import tiny_teacher_overrides

from benchmarks.soak import SoakConfig, format_report, memory_growth_mib, run_soak
from teacher_service.config import GrpcOptions, ServingConfig, TeacherConfig

pytestmark = pytest.mark.ray

TEACHER = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1,
                        serving=ServingConfig(app_name="kd-teacher-soak", num_cpus=0.5, max_batch_size=64,
                                              expected_request_samples=8),
                        grpc=GrpcOptions(caller_max_in_flight=4))
SOAK = SoakConfig(duration_s=20.0, warmup_s=4.0, students=3, grpc_clients=6)
MEMORY_TOLERANCE_MIB = 32.0  # allocator noise over 16 s; a leak of one 16-sample batch per request is far more


def test_soak_serves_every_client_without_errors_or_memory_growth(ray_cluster):
    from reliability_record import record

    report = run_soak(TEACHER, SOAK)
    record("soak_20s", report)
    print(format_report(report))
    students, grpc = report["students"], report["grpc"]
    assert students["errors"] == 0 and grpc["errors"] == 0, (students["error_examples"], grpc["error_examples"])
    assert students["served"] > 0 and grpc["served"] > 0
    # 6 threads against a limit of 4 in flight: the surplus is refused, by that reason only, and counted
    assert set(grpc["refused"]) <= {"in_flight_limit"}
    assert report["teacher"]["errors_in_flight_limit"] == grpc["refused"].get("in_flight_limit", 0)
    assert report["teacher"]["requests"] == students["served"] + grpc["served"]
    growth = memory_growth_mib(report)
    assert set(growth) == {*(k for k in report["memory_start_mib"] if k.startswith("replica")), "grpc ingress"}
    assert all(g <= MEMORY_TOLERANCE_MIB for g in growth.values()), growth
