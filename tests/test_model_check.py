"""The teacher's (and student's) open_clip model checked on the driver before Ray or Serve starts.

Each bad input (an unknown architecture, a pretrained tag its architecture lacks, a missing
checkpoint file, overrides open_clip does not take or cannot build with) is refused by `kd teacher
serve`, `kd train`, `kd precompute`, `kd demo` and the Serve app builder with exit 2 and one
`kd: error:` line naming the value and the nearest valid names, before a Ray cluster starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_teacher_overrides

from cluster.cli import main
from student_trainer.config import ModelConfig
from student_trainer.factory import check_model_config
from teacher_service.config import TeacherConfig
from teacher_service.model_check import check_model

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "cluster" / "configs" / "serve_teacher.yaml"
RAY_STARTED = ("Ray cluster", "Started a local Ray instance")  # what init_ray / ray.init say once a cluster is up


# ---------------------------------------------------------------- the check itself
@pytest.mark.parametrize("model, pretrained, overrides, says", [
    ("ViT-B-23", None, {}, r"teacher model 'ViT-B-23' is not an open_clip architecture; nearest: ViT-B-32"),
    ("vit-b-32", None, {}, r"nearest: ViT-B-32"),
    ("ViT-B-32", "laion2b", {}, r"teacher pretrained 'laion2b' is not a pretrained tag of ViT-B-32 nor a checkpoint "
                                r"file; nearest tags: .*laion2b_s34b_b79k"),
    ("ViT-B-32", None, {"embed_dm": 64}, r"teacher overrides key 'embed_dm' is not an argument of "
                                         r"open_clip.create_model nor of CLIP; nearest: embed_dim"),
    ("ViT-B-32", None, {"vision_cfg": {"widht": 64}}, r"teacher overrides vision_cfg key 'widht' is not a field of "
                                                      r"open_clip's CLIPVisionCfg; nearest: width"),
    ("ViT-B-32", None, {"embed_dim": "64"}, r"teacher overrides \{'embed_dim': '64'\}: open_clip cannot build "
                                            r"ViT-B-32 with them: TypeError"),
    ("ViT-B-32", None, {"output_dict": False}, r"teacher overrides key 'output_dict' is set by the loader itself"),
    ("hf-hub:org/repo", "openai", {}, r"teacher pretrained 'openai' is given with model 'hf-hub:org/repo'"),
])
def test_bad_model_fields_are_named_with_the_nearest_valid_names(model, pretrained, overrides, says):
    with pytest.raises(ValueError, match=says):
        check_model(model, pretrained, overrides)
    with pytest.raises(ValueError, match=says):  # every TeacherConfig checks its model when built
        TeacherConfig(model=model, pretrained=pretrained, overrides=overrides)


def test_a_missing_checkpoint_path_is_named_with_the_files_beside_it(tmp_path):
    (tmp_path / "techer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"teacher pretrained '{tmp_path}/teacher.pt': no such checkpoint file in "
                                         rf"{tmp_path} \(nearest there: techer.pt\)"):
        check_model("ViT-B-32", str(tmp_path / "teacher.pt"))
    with pytest.raises(ValueError, match=r"'teacher.pth': no such checkpoint file"):  # a suffix makes it a path
        check_model("ViT-B-32", "teacher.pth")
    with pytest.raises(ValueError, match=r"its directory .*nowhere does not exist either"):
        check_model("ViT-B-32", str(tmp_path / "nowhere" / "teacher.pt"))
    with pytest.raises(ValueError, match=r"is a directory: give the checkpoint file in it"):
        check_model("ViT-B-32", str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_checkpoint_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"")
    path.chmod(0)
    with pytest.raises(ValueError, match="not readable by this user"):
        check_model("ViT-B-32", str(path))


def test_valid_models_pass_without_downloading_or_loading(tmp_path, monkeypatch):
    import open_clip

    def no_download(*args, **kwargs):
        raise AssertionError("the check downloaded weights")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", no_download)
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(b"not loaded, so not read")  # existence and readability only
    rng = torch.random.get_rng_state()
    check_model("ViT-B-32")  # random init
    check_model("ViT-B-32", "openai")  # a registered tag, looked up only
    check_model("ViT-B-32", "LAION2B-S34B-B79K")  # open_clip's own spelling rules for tags
    check_model("ViT-B-32", str(checkpoint), tiny_teacher_overrides())
    check_model("RN50", None, {"vision_cfg": {"layers": [1, 1, 1, 1], "width": 8}})
    assert torch.equal(torch.random.get_rng_state(), rng)  # the meta build drew nothing
    assert TeacherConfig(pretrained=str(checkpoint)).pretrained == str(checkpoint)


def test_a_student_may_name_a_preset_and_is_offered_them():
    check_model_config(ModelConfig(name="digits-student"))
    check_model_config(ModelConfig(name="ViT-B-32", pretrained="openai"))
    with pytest.raises(ValueError, match=r"model.name 'digits-studnt' is not an open_clip architecture nor a preset "
                                         r"of this project; nearest: digits-student"):
        check_model_config(ModelConfig(name="digits-studnt"))
    with pytest.raises(ValueError, match=r"model.overrides vision_cfg key 'layer' .*nearest: layers"):
        check_model_config(ModelConfig(name="digits-student", overrides={"vision_cfg": {"layer": 2}}))
    with pytest.raises(ValueError, match=r"model.pretrained 'opnai' is not a pretrained tag of ViT-B-32"):
        check_model_config(ModelConfig(name="ViT-B-32", pretrained="opnai"))


def test_the_serve_app_builder_raises_the_message_kd_prints():
    """Serve reports a RayServeException from an app builder as the deploy's message, once, untouched."""
    from ray.serve.exceptions import RayServeException

    from cluster.cli.args import teacher_config
    from teacher_service.serve.deployment import app_builder

    args = yaml.safe_load(SERVE_YAML.read_text())["applications"][0]["args"]
    with pytest.raises(ValueError) as kd_said:
        teacher_config(None, {"model": "ViT-B-23"})
    with pytest.raises(RayServeException) as serve_said:
        app_builder({**args, "model": "ViT-B-23"})
    assert isinstance(serve_said.value, ValueError)
    assert str(serve_said.value) == str(kd_said.value)
    assert "nearest: ViT-B-32" in str(serve_said.value)


# ---------------------------------------------------------------- the commands
def kd_refuses(argv: list[str], *said: str) -> str:
    """`python -m cluster.cli ARGV`, as a user runs it, exits 2 with one `kd: error:` line holding
    `said`, before a Ray cluster starts."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", *argv], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    seconds = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if "kd: error:" in line]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("kd: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for text in said:
        assert text in errors[0]
    assert not any(word in proc.stdout + proc.stderr for word in RAY_STARTED)
    assert seconds < 300  # a guard only: a Serve start with its replica retries takes minutes here
    return errors[0]


@pytest.fixture
def kd_in_process(monkeypatch, capsys):
    """`kd ARGV` in this process (no fresh interpreter to import torch and Ray into: a minute each on
    a busy 2-core machine), with Ray's start made an error: returns the one line it printed."""
    import cluster.local

    def no_ray(*args, **kwargs):
        raise AssertionError("the command started Ray before checking its model")

    monkeypatch.setattr(cluster.local, "init_ray", no_ray)

    def refuses(argv: list[str], *said: str) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("kd: error: ") and all(text in line for text in said), line
        return line

    return refuses


def test_kd_teacher_serve_refuses_an_unknown_architecture():
    kd_refuses(["teacher", "serve", "--model", "ViT-B-23"], "'ViT-B-23'", "nearest: ViT-B-32")


@pytest.mark.parametrize("flags, said", [
    (["--pretrained", "laion2b"], ("'laion2b'", "laion2b_s34b_b79k")),
    (["--pretrained", "nowhere/teacher.pt"], ("'nowhere/teacher.pt'", "no such checkpoint file")),
    (["--overrides", '{"embed_dm": 64}'], ("'embed_dm'", "nearest: embed_dim")),
    (["--overrides", '{"embed_dim": "64"}'], ("{'embed_dim': '64'}", "cannot build ViT-B-32")),
], ids=["tag", "path", "override-key", "override-type"])
def test_kd_teacher_serve_refuses_a_bad_model(kd_in_process, flags, said):
    kd_in_process(["teacher", "serve", *flags], *said)


def test_kd_teacher_serve_refuses_a_bad_serve_config_file(kd_in_process, tmp_path):
    raw = yaml.safe_load(SERVE_YAML.read_text())
    raw["applications"][0]["args"]["model"] = "ViT-B-23"
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(raw))
    kd_in_process(["teacher", "serve", "--config", str(tmp_path / "serve.yaml")], "'ViT-B-23'", "nearest: ViT-B-32")


def test_kd_precompute_refuses_a_bad_model(kd_in_process, tmp_path):
    argv = ["precompute", "--shards", str(tmp_path / "train-*.tar"), "--out", str(tmp_path / "cache")]
    kd_refuses([*argv, "--model", "ViT-B-23"], "'ViT-B-23'", "nearest: ViT-B-32")
    kd_in_process([*argv, "--pretrained", "opnai"], "'opnai'", "nearest tags: openai")
    kd_in_process([*argv, "--overrides", '{"text_cfg": {"with": 64}}'], "text_cfg key 'with'", "nearest: width")
    assert not (tmp_path / "cache").exists()


def run_config(tmp_path, **run) -> list[str]:
    """`kd train` of a run config whose shards do not exist (the model check comes first)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_shards": str(tmp_path / "train-*.tar")}, **run}))
    return ["train", "--config", str(path), "--storage-path", str(tmp_path / "runs")]


def test_kd_train_refuses_a_missing_inline_teacher_checkpoint(tmp_path):
    teacher = {"mode": "inline", "teacher": {"model": "ViT-B-32", "pretrained": "nowhere/teacher.pt"}}
    kd_refuses(run_config(tmp_path, teacher=teacher), "teacher pretrained 'nowhere/teacher.pt'",
               "no such checkpoint file")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("run, said", [
    ({"teacher": {"mode": "inline", "teacher": {"model": "ViT-B-23"}}}, ("teacher model 'ViT-B-23'", "ViT-B-32")),
    ({"model": {"name": "digits-studnt"}}, ("model.name 'digits-studnt'", "nearest: digits-student")),
    ({"model": {"name": "ViT-B-32", "pretrained": "opnai"}}, ("model.pretrained 'opnai'", "nearest tags: openai")),
    ({"model": {"name": "digits-student", "overrides": {"embed_dim": [64]}}}, ("model.overrides", "cannot build")),
], ids=["inline-teacher-architecture", "student-preset", "student-tag", "student-override"])
def test_kd_train_refuses_a_bad_teacher_or_student_model(kd_in_process, tmp_path, run, said):
    kd_in_process(run_config(tmp_path, **run), *said)
    assert not (tmp_path / "runs").exists()


def test_valid_models_pass_the_commands_check(tmp_path, capsys):
    """A real architecture with pretrained None, a local checkpoint path and a preset get past the model
    check to the next one (the shards, absent here), so the commands stop before Ray all the same."""
    checkpoint = tmp_path / "teacher.pt"
    checkpoint.write_bytes(b"")
    missing = str(tmp_path / "train-*.tar")
    for argv in (["precompute", "--model", "ViT-B-32", "--shards", missing, "--out", str(tmp_path / "c")],
                 ["precompute", "--pretrained", str(checkpoint), "--overrides", json.dumps(tiny_teacher_overrides()),
                  "--shards", missing, "--out", str(tmp_path / "c")],
                 ["train", "--student", "digits-student", "--train-shards", missing]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"kd: error: no shards found for {missing!r}\n"


def test_kd_demo_checks_its_models_before_ray_starts(kd_in_process, tmp_path, monkeypatch):
    """The demo takes no model flags: its teacher and student presets are checked as `kd train` checks them."""
    import cluster.demo

    monkeypatch.setattr(cluster.demo, "TEACHER", "digits-teachr")
    kd_in_process(["demo", "--quick", "--workdir", str(tmp_path / "demo")],
                  "kd: error: model.name 'digits-teachr' is not an open_clip architecture nor a preset",
                  "nearest: digits-teacher")
    assert not (tmp_path / "demo").exists()  # nothing written


# ---------------------------------------------------------------- serve deploy
@pytest.mark.ray
def test_a_bad_serve_config_fails_its_deploy_with_the_message_and_no_replica(ray_cluster):
    """`serve deploy` hands the config to the controller (`deploy_apps`, as Serve's dashboard does); the
    app builder's refusal makes the app DEPLOY_FAILED with the check's message, before any replica."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    app = "kd-teacher-bad-model"
    raw = yaml.safe_load(SERVE_YAML.read_text())
    raw["applications"][0].update(name=app)
    raw["applications"][0]["args"].update(model="ViT-B-23")
    raw["applications"][0]["args"]["serving"]["app_name"] = app
    with pytest.raises(ValueError) as check:
        TeacherConfig.from_dict(raw["applications"][0]["args"])
    serve.start(proxy_location="Disabled")
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(raw))
    try:
        deadline = time.monotonic() + 300  # the build task imports torch and open_clip in a fresh worker
        status = serve.status().applications.get(app)
        while (status is None or str(status.status).endswith(("NOT_STARTED", "DEPLOYING"))) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            status = serve.status().applications.get(app)
        assert str(status.status).endswith("DEPLOY_FAILED"), status
        assert status.message == f"Deploying app '{app}' failed with exception:\n{check.value}"
        assert not status.deployments  # no replica was ever started
    finally:
        serve.delete(app)
