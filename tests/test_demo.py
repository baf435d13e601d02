"""`kd demo --quick` on the session's cluster: the real path (data, teacher, Serve app, distilled and
baseline students, evaluation, report.json with every field), and the check before a teacher left in
the workdir is reused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from idx_builders import make_split

pytestmark = pytest.mark.ray

METRICS = ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1")


@pytest.fixture(scope="module")
def demo(ray_cluster, tmp_path_factory):
    """One `kd demo --quick` for the module (one teacher, distilled student, baseline). `--teachers 2`
    adds a second teacher, its app and an ensemble student: ~50 s more here, so its wiring is checked
    below with training, Serve and evaluation stood in for, and a live run distilling from two apps
    and recording both in its checkpoint is tests/test_ensemble_ray.py's."""
    from cluster.demo import DemoConfig, run_demo

    tmp_path = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), quick=True, app_name="kd-demo-test")
    return cfg, run_demo(cfg), tmp_path


def test_quick_demo_writes_a_complete_report(demo):
    cfg, report, tmp_path = demo
    assert json.loads((tmp_path / "demo" / "report.json").read_text()) == report
    assert set(report["models"]) == {"teacher", "student_distilled", "student_baseline"}
    assert "teacher_fingerprints" not in report and "ensemble_gain_over_baseline" not in report  # one teacher
    for row in report["models"].values():
        for metric in METRICS:
            assert 0.0 <= row[metric] <= 1.0
        assert row["params"] > 0 and row["wall_time_s"] is not None
    assert report["models"]["teacher"]["params"] > report["models"]["student_distilled"]["params"]
    assert report["baseline"] == "student_baseline"
    assert report["data"] == {"name": "digits", "shards": str(tmp_path / "demo" / "data"), "train_samples": 1437,
                              "val_samples": 360}  # scikit-learn's 1 797 digits, 20 % held out
    for metric in METRICS:
        gap = report["models"]["student_distilled"][metric] - report["models"]["student_baseline"][metric]
        assert report["gain_over_baseline"][metric] == pytest.approx(gap, abs=1e-4)
    assert report["teacher_fingerprint"] and report["distill_losses"] == cfg.distill_losses
    assert report["epochs"] == {"teacher": 1, "student": 1} and report["demo_wall_time_s"] > 0
    # the pictures (cluster.report): both students' curves, the three models' bars with the baseline
    assert report["plots"] == ["learning_curves.png", "final_metrics.png"]
    assert all((tmp_path / "demo" / p).stat().st_size > 1000 for p in report["plots"])
    assert sorted(r.split("-")[1] for r in report["runs"]) == ["baseline", "distill"]

    # every run's TensorBoard files hold its training curves and the demo's evaluation of it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("teacher", "student_distilled", "student_baseline"):
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

    # and is exported for open_clip, its model card naming its teacher and the demo's evaluation of it
    card = (tmp_path / "demo" / "export" / "student_distilled" / "README.md").read_text()
    assert f"fingerprint `{report['teacher_fingerprint']}`" in card
    assert f"{report['models']['student_distilled']['zero_shot_top1']:.4f}" in card
    assert (tmp_path / "demo" / "export" / "student_baseline" / "open_clip_model.safetensors").is_file()


def test_quick_demo_with_two_teachers_adds_an_ensemble_student(tmp_path, monkeypatch):
    """`kd demo --data fashion-mnist --teachers 2`: a second teacher (next seed, own dir, own app), and a
    student distilled from both apps at once, reported against the baseline. The real run_demo (data
    shards from tiny IDX files included) with training, the Serve apps and evaluation stood in for:
    what it hands each of them is checked."""
    import ray.serve

    import cluster.demo as demo_module
    import cluster.local
    import cluster.report
    import student_trainer.evaluate
    import student_trainer.export
    import teacher_service.app
    from cluster.demo import DemoConfig, run_demo

    trained, deployed, deleted, drawn, exported = {}, [], [], [], {}

    def fake_train(train_cfg, out_dir, verbose=False):
        trained[out_dir.name] = train_cfg
        out_dir.mkdir(parents=True)
        (out_dir / "model.pt").write_bytes(b"stand-in weights")  # what the teacher's config is checked against
        return {"step": 2, "wall_time_s": 1.0, "run_dir": str(tmp_path / "runs" / train_cfg.run_name)}

    class Handle:  # deploy(cfg).info.remote().result(timeout_s=...)
        def __init__(self, cfg):
            self.info, self.cfg = self, cfg

        def remote(self):
            return self

        def result(self, timeout_s):
            return {"fingerprint": f"fp-{self.cfg.serving.app_name}", "embed_dim": 128}

    def fake_deploy(cfg, access_log=False):
        deployed.append(cfg)
        return Handle(cfg)

    # distinct metrics per model: every gain below is a real difference of two of them
    score = {"kd-demo-test": 0.5, "kd-demo-test-2": 0.6, "student_distilled": 0.3, "student_ensemble": 0.4,
             "student_baseline": 0.2}

    def evaluation(name):
        return {m: score[name] + 0.01 * i for i, m in enumerate(METRICS)} | {"params": 1000}

    def fake_write_report(paths, out):  # adds the pictures to report.json, as cluster.report does
        drawn.extend(Path(p).name for p in paths)
        doc = {**json.loads((out / "report.json").read_text()), "plots": []}
        (out / "report.json").write_text(json.dumps(doc))
        return doc

    monkeypatch.setattr(demo_module, "_train", fake_train)
    monkeypatch.setattr(cluster.local, "init_ray", lambda *a, **k: "stand-in cluster")
    monkeypatch.setattr(teacher_service.app, "deploy", fake_deploy)
    monkeypatch.setattr(ray.serve, "delete", deleted.append)
    monkeypatch.setattr(student_trainer.evaluate, "evaluate_teacher", lambda cfg, val: evaluation(cfg.serving.app_name))
    monkeypatch.setattr(student_trainer.evaluate, "evaluate_checkpoint", lambda d, val: evaluation(Path(d).name))
    monkeypatch.setattr(cluster.report, "write_report", fake_write_report)
    monkeypatch.setattr(student_trainer.export, "export_checkpoint",
                        lambda checkpoint, out, force: exported.setdefault(Path(checkpoint).name, (out, force))[0])

    idx_dir = tmp_path / "fashion-mnist"  # as Debian's package names them, 3 + 2 photographs per class
    idx_dir.mkdir()
    make_split(idx_dir, "train", [3] * 10, 1, gz=True)
    make_split(idx_dir, "t10k", [2] * 10, 2, gz=True)
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), quick=True, app_name="kd-demo-test", teachers=2,
                     data="fashion-mnist", data_dir=str(idx_dir), train_limit=20)
    report = run_demo(cfg)
    assert json.loads((tmp_path / "demo" / "report.json").read_text()) == report
    shards = tmp_path / "demo" / "data-fashion-mnist"
    assert report["data"] == {"name": "fashion-mnist", "shards": str(shards), "train_samples": 20, "val_samples": 20}
    assert {(t.data.train_shards, t.data.val_shards) for t in trained.values()} == {
        (str(shards / "train-*.tar"), str(shards / "val-*.tar"))}  # every run on the Fashion-MNIST shards

    # two teachers, seeds 0 and 1, each trained into its own dir and served as its own app from there
    assert sorted(trained) == ["student_baseline", "student_distilled", "student_ensemble", "teacher", "teacher-2"]
    assert [trained[t].seed for t in ("teacher", "teacher-2")] == [0, 1]
    assert all(trained[t].teacher.mode == "none" for t in ("teacher", "teacher-2"))
    apps = ["kd-demo-test", "kd-demo-test-2"]
    assert [d.serving.app_name for d in deployed] == apps and sorted(deleted) == apps
    assert [Path(d.pretrained).parent.name for d in deployed] == ["teacher", "teacher-2"]
    assert all(d.serving.num_cpus == 0.5 for d in deployed)  # both pools fit beside the students
    # the ensemble student asks both apps at once; the distilled one only the first
    ensemble = trained["student_ensemble"].teacher
    assert ensemble.mode == "remote" and [(s["name"], s["app_name"]) for s in ensemble.sources] == [(a, a) for a in apps]
    assert trained["student_distilled"].teacher.app_name == apps[0] and not trained["student_distilled"].teacher.sources
    assert trained["student_baseline"].teacher.mode == "none"
    assert trained["student_ensemble"].losses == cfg.distill_losses

    assert set(report["models"]) == {"teacher", "teacher_2", "student_distilled", "student_ensemble",
                                     "student_baseline"}
    assert report["models"]["teacher_2"]["zero_shot_top1"] == score["kd-demo-test-2"]
    first, second = report["teacher_fingerprints"]
    assert (first, second) == ("fp-kd-demo-test", "fp-kd-demo-test-2") and report["teacher_fingerprint"] == first
    for metric in METRICS:
        gap = report["models"]["student_ensemble"][metric] - report["models"]["student_baseline"][metric]
        assert report["ensemble_gain_over_baseline"][metric] == pytest.approx(gap, abs=1e-4) and gap > 0.1
        gap = report["models"]["student_distilled"][metric] - report["models"]["student_baseline"][metric]
        assert report["gain_over_baseline"][metric] == pytest.approx(gap, abs=1e-4)
    assert sorted(name.split("-")[1] for name in drawn) == ["baseline", "distill", "ensemble"]  # the students' curves
    students = ["student_distilled", "student_ensemble", "student_baseline"]  # each exported for open_clip
    assert exported == {n: (tmp_path / "demo" / "export" / n, True) for n in students}


def test_a_trained_checkpoint_replaces_the_old_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    """`_train` copies the run's final checkpoint, with its run_metrics.json, over an earlier folder:
    a reader sees the old folder or the new one, and a copy that fails leaves the old one and no
    temporary. Training stood in for (a checkpoint folder holding model.pt)."""
    import contextlib
    from types import SimpleNamespace

    import student_trainer.train
    from cluster.demo import _train
    from student_trainer.config import DataConfig, TrainConfig
    from teacher_service.atomic_files import TMP_MARK

    checkpoint = tmp_path / "ray-checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.pt").write_bytes(b"new weights")
    result = SimpleNamespace(metrics={"step": 7},
                             checkpoint=SimpleNamespace(as_directory=lambda: contextlib.nullcontext(checkpoint)))
    monkeypatch.setattr(student_trainer.train, "run_training", lambda cfg, verbose=False: result)
    out = tmp_path / "demo" / "teacher"
    out.mkdir(parents=True)
    (out / "model.pt").write_bytes(b"old weights")
    (out / "stale.txt").write_text("from the earlier run")
    run = TrainConfig(run_name="t", storage_path=str(tmp_path / "runs"), data=DataConfig(train_shards="x.tar"))

    metrics = _train(run, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "run_metrics.json"]
    assert (out / "model.pt").read_bytes() == b"new weights"
    assert json.loads((out / "run_metrics.json").read_text()) == json.loads(json.dumps(metrics, default=str))
    assert metrics["step"] == 7 and metrics["run_dir"] == str(tmp_path / "runs" / "t")

    (checkpoint / "model.pt").write_bytes(b"newer weights")
    monkeypatch.setattr("shutil.copytree", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        _train(run, out)
    assert (out / "model.pt").read_bytes() == b"new weights"
    assert not [p for p in out.parent.iterdir() if TMP_MARK in p.name]


def test_a_teacher_left_in_the_workdir_is_checked_before_it_is_reused(demo, tmp_path):
    """Reused only for the same architecture, data, seed and epochs (edits a copy of the demo's
    teacher and data description: the demo's workdir stays as the run left it)."""
    import shutil

    from cluster.demo import reusable_teacher, teacher_identity

    cfg, report, demo_path = demo
    teacher_dir, data_dir = tmp_path / "teacher", tmp_path / "data"
    shutil.copytree(demo_path / "demo" / "teacher", teacher_dir)
    data_dir.mkdir()
    shutil.copy(demo_path / "demo" / "data" / "dataset.json", data_dir)
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
            "from teacher_service.app import deploy; from teacher_service.config import ServingConfig, TeacherConfig; "
            "from tiny_models import tiny_teacher_overrides; "
            "cfg = TeacherConfig(overrides=tiny_teacher_overrides(), "
            "serving=ServingConfig(app_name='quiet-app', num_cpus=0.5)); "
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

