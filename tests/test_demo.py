"""`kd demo --quick` on the session's cluster: the real path (data, teacher, Serve app, distilled and
baseline students, evaluation, report.json with every field), and the check before a teacher left in
the workdir is reused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

METRICS = ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1")


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    """One `kd demo --quick --teachers 2` for the module: the single-teacher path is its first half
    (teacher, distilled student, baseline); the second teacher and the ensemble student are the rest."""
    from cluster.demo import DemoConfig, run_demo

    tmp_path = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), quick=True, app_name="kd-demo-test", teachers=2)
    return cfg, run_demo(cfg), tmp_path


def test_quick_demo_writes_a_complete_report(demo):
    cfg, report, tmp_path = demo
    assert json.loads((tmp_path / "demo" / "report.json").read_text()) == report
    assert set(report["models"]) == {"teacher", "teacher_2", "student_distilled", "student_ensemble",
                                     "student_baseline"}
    for row in report["models"].values():
        for metric in METRICS:
            assert 0.0 <= row[metric] <= 1.0
        assert row["params"] > 0 and row["wall_time_s"] is not None
    assert report["models"]["teacher"]["params"] > report["models"]["student_distilled"]["params"]
    assert report["baseline"] == "student_baseline"
    for metric in METRICS:
        gap = report["models"]["student_distilled"][metric] - report["models"]["student_baseline"][metric]
        assert report["gain_over_baseline"][metric] == pytest.approx(gap, abs=1e-4)
    assert report["teacher_fingerprint"] and report["distill_losses"] == cfg.distill_losses
    assert report["epochs"] == {"teacher": 1, "student": 1} and report["demo_wall_time_s"] > 0
    # the pictures (cluster.report): both students' curves, the three models' bars with the baseline
    assert report["plots"] == ["learning_curves.png", "final_metrics.png"]
    assert all((tmp_path / "demo" / p).stat().st_size > 1000 for p in report["plots"])
    assert sorted(r.split("-")[1] for r in report["runs"]) == ["baseline", "distill", "ensemble"]

    # every run's TensorBoard files hold its training curves and the demo's evaluation of it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("teacher", "student_distilled", "student_ensemble", "student_baseline"):
        run = json.loads((tmp_path / "demo" / name / "run_metrics.json").read_text())
        events = EventAccumulator(run["tensorboard"])
        events.Reload()
        assert {"train/loss", "train/clip_loss", "train/lr", "eval/zero_shot_top1"} <= set(events.Tags()["scalars"]), name
        top1 = events.Scalars("eval/zero_shot_top1")
        assert [(e.step, round(e.value, 4)) for e in top1] == [(run["step"], round(report["models"][name]["zero_shot_top1"], 4))]

    # every student checkpoint records what it was distilled from
    from student_trainer.checkpoint import read_provenance

    distilled = read_provenance(tmp_path / "demo" / "student_distilled")
    assert distilled["teacher"]["fingerprint"] == report["teacher_fingerprint"]
    assert distilled["teacher"]["mode"] == "remote" and distilled["teacher"]["app_name"] == cfg.app_name
    assert distilled["losses"] == cfg.distill_losses
    baseline = read_provenance(tmp_path / "demo" / "student_baseline")
    assert baseline["teacher"]["mode"] == "none" and baseline["teacher"]["fingerprint"] == ""


def test_quick_demo_with_two_teachers_adds_an_ensemble_student(demo):
    """`kd demo --teachers 2`: a second teacher (next seed, own app), and a student distilled from both."""
    from student_trainer.checkpoint import read_provenance

    cfg, report, tmp_path = demo
    first, second = report["teacher_fingerprints"]
    assert first == report["teacher_fingerprint"] and second != first  # another seed, another teacher
    for metric in METRICS:
        gap = report["models"]["student_ensemble"][metric] - report["models"]["student_baseline"][metric]
        assert report["ensemble_gain_over_baseline"][metric] == pytest.approx(gap, abs=1e-4)
    ensemble = read_provenance(tmp_path / "demo" / "student_ensemble")
    assert [t["fingerprint"] for t in ensemble["teachers"]] == [first, second]
    assert [t["app_name"] for t in ensemble["teachers"]] == ["kd-demo-test", "kd-demo-test-2"]


def test_a_teacher_left_in_the_workdir_is_checked_before_it_is_reused(demo):
    """Reused only for the same architecture, data, seed and epochs (this test edits the workdir: last)."""
    from cluster.demo import reusable_teacher, teacher_identity

    cfg, report, tmp_path = demo
    teacher_dir, data_dir = tmp_path / "demo" / "teacher", tmp_path / "demo" / "data"
    identity = teacher_identity(cfg, data_dir, 1)
    assert reusable_teacher(teacher_dir, identity) is None
    assert "epochs" in reusable_teacher(teacher_dir, teacher_identity(cfg, data_dir, 30))
    info = data_dir / "dataset.json"
    info.write_text(info.read_text().replace("digit", "Digit"))  # other data, same file names
    assert "data" in reusable_teacher(teacher_dir, teacher_identity(cfg, data_dir, 1))
    (teacher_dir / "demo_teacher.json").unlink()
    assert "records no" in reusable_teacher(teacher_dir, identity)


def test_an_embedded_cluster_starts_even_when_another_runs_here(ray_cluster):
    """`kd demo` / `kd train` without --address start their own cluster; with another one running on
    the machine (here the session's), Ray's default would join it and refuse num_cpus."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    # its workers run the setup hook that keeps Ray Train's placement-group cleaner from warning
    # every few seconds that the state API (absent without a dashboard) did not answer
    # and a quiet driver prints none of the INFO lines Ray forwards from Serve's actors: deploy steps
    # of the controller and proxy, and the access log of a pool deployed with it on
    code = ("from cluster.local import init_ray; import ray, logging; print(init_ray(quiet=False, verbose=False)); "
            "print('GCS', ray.get_runtime_context().gcs_address); "
            "from student_trainer.progress import PLACEMENT_GROUP_CLEANER_LOGGER as name; "
            "level = ray.remote(lambda: logging.getLogger(name).getEffectiveLevel()); "
            "print('CLEANER', logging.getLevelName(ray.get(level.remote()))); "
            "from ray._private.services import canonicalize_bootstrap_address_or_die as lookup; "
            "print('FOUND', ray.get(ray.remote(lambda: lookup(None)).remote())); "
            "from teacher_service.app import deploy; from teacher_service.config import TeacherConfig; "
            "from tiny_models import tiny_teacher_overrides; "
            "cfg = TeacherConfig(overrides=tiny_teacher_overrides(), app_name='quiet-app', num_cpus=0.5); "
            "handle = deploy(cfg, access_log=True); [handle.info.remote().result(timeout_s=120) for _ in range(3)]; "
            "print('ANSWERED', handle.info.remote().result(timeout_s=120)['fingerprint']); "
            "from ray import serve; print('PROXIES', len(serve.status().proxies)); "
            "import time; time.sleep(2); ray.shutdown()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "started an embedded local Ray cluster" in proc.stdout
    own = proc.stdout.split("GCS ", 1)[1].split()[0]
    assert own != ray_cluster.get_runtime_context().gcs_address
    assert "CLEANER ERROR" in proc.stdout, proc.stdout
    assert proc.stdout.split("FOUND ", 1)[1].split()[0] == own  # not "multiple active Ray instances"
    assert "ANSWERED " in proc.stdout, proc.stdout
    assert "PROXIES 0" in proc.stdout, proc.stdout  # deploy() started Serve without an HTTP proxy (unused)
    console = proc.stdout + proc.stderr
    assert not [line for line in console.splitlines() if "ServeController" in line or "ProxyActor" in line
                or "CALL info" in line], console

