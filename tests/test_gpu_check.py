"""The GPU check (benchmarks/gpu_check.sh, issue 31): its dry run on CPU writes every section with
sane values, its wrapper fails fast with a clear message where it cannot run, its report says
which section did not finish, and its checks can fail (a wrong gather, a loss off its tolerance).
No timed assertions: the dry run's figures mean nothing."""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check.config import SECTIONS, dry_run_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _script(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=full_env, check=False)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_dry_run_writes_every_section_with_sane_values(ray_cluster, tmp_path):
    """Every section of the real check, on CPU at tiny sizes, on the session's cluster."""
    from benchmarks.gpu_check.report import write_report
    from benchmarks.gpu_check.run import Workspace, run_section

    cfg = dry_run_config()
    ws = Workspace(cfg)
    try:
        for name in SECTIONS:
            run_section(name, cfg, ws, tmp_path)
    finally:
        ws.close()
    assert write_report(tmp_path) == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry_run"] and doc["verdict"] == "PASSED", (doc["broken_sections"], doc["failed_checks"])
    sections = doc["sections"]
    assert {n: s["status"] for n, s in sections.items()} == dict.fromkeys(SECTIONS, "ok")
    assert torch.__version__ in doc["machine"]
    assert torch.cuda.is_available() or sections["machine"]["gpu"]["devices"] == []
    _check_losses(sections["losses"], cfg)
    assert sections["gather"]["backends"] == ["gloo"] and all(c["passed"] for c in sections["gather"]["checks"])
    _check_teacher(sections["teacher"], cfg)
    _check_students(sections["students"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "RESULT: PASSED" in md and "served/direct" in md and "x none" in md


def _check_losses(s: dict, cfg) -> None:
    from student_trainer.losses import LOSSES

    assert set(s["losses"]) == set(LOSSES)
    for name, row in s["losses"].items():
        assert math.isfinite(row["value_cpu_fp32"]), name
        assert row["fp32"] == 0.0, name  # CPU against CPU: the same computation
        assert 0 < row["autocast_bfloat16"] <= cfg.autocast_tol["bfloat16"], name  # bf16 really ran
    assert len(s["checks"]) == 2 * len(LOSSES) and all(c["passed"] for c in s["checks"])


def _check_teacher(s: dict, cfg) -> None:
    points = {(p["precision"], p["batch_size"]): p for p in s["points"]}
    assert set(points) == {(p, b) for p in cfg.precisions for b in cfg.batch_sizes}
    for (precision, b), p in points.items():
        assert p["direct"] > 0 and p["served"] > 0
        assert p["ratio"] == pytest.approx(p["served"] / p["direct"])  # one repeat: the ratio of the medians
        assert b <= p["mean_forward_samples"] <= 2 * b
    assert {r["unit"] for r in s["records"]} == {"samples/s", "x"}
    assert s["teacher"]["device"] == "cpu" and s["teacher"]["embed_dim"] == cfg.teacher_overrides["embed_dim"]


def _check_students(s: dict) -> None:
    modes = s["modes"]
    assert list(modes) == ["none", "remote", "cache"]
    assert modes["none"]["ratio_to_none"] == 1.0
    for mode, r in modes.items():
        assert r["samples_per_s"] > 0 and r["teacher_wait_s"] >= 0 and r["student_peak_rss_mb"] > 0, mode
        assert r["student_gpu_peak_mb"] is None, mode  # CPU: no GPU figure rather than a zero
        assert r["profile_ms"]["compute"] > 0, mode
        if shutil.which("nvidia-smi") is None:
            assert r["nvidia_smi"]["available"] is False
    # the pool computed only for remote: none asks no teacher, cache reads the precomputed rows
    assert modes["none"]["pool_forward_s"] == 0 and modes["cache"]["pool_forward_s"] == 0
    assert modes["remote"]["pool_forward_s"] > 0 and modes["remote"]["separate_gpu_estimate_ratio"] > 0
    assert s["teacher_gpu_peak_mb"] is None
    assert {c["enforced"] for c in s["checks"]} == {False}  # the dry run enforces no speed target


@pytest.mark.slow  # the bash wrapper runs the losses section in a process of its own
def test_the_wrapper_runs_a_dry_section_and_writes_the_report(tmp_path):
    done = _script("--dry-run", "--sections", "losses", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["sections"]["losses"]["status"] == "ok" and doc["verdict"] == "INCOMPLETE"
    assert doc["not_run"] == ["machine", "gather", "teacher", "students"]
    assert "RESULT: INCOMPLETE" in done.stdout and (tmp_path / "gpu_check.log").is_file()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_the_wrapper_refuses_a_machine_without_gpu_before_writing_anything(tmp_path):
    done = _script("--out", str(tmp_path / "results"))
    assert done.returncode == 3 and "not a GPU machine" in done.stderr
    assert not (tmp_path / "results").exists()


def test_the_wheel_check_names_what_is_missing_and_what_is_extra(tmp_path):
    from benchmarks.gpu_wheels import pins

    wanted = pins()
    assert {p.split("==")[0] for p in wanted} >= {"ray", "open_clip_torch", "webdataset", "grpcio", "protobuf"}
    done = _script("--check-wheels", env={"GPU_CHECK_WHEELS": str(tmp_path / "absent")})
    assert done.returncode == 3 and "gpu_wheels.py" in done.stderr
    for pin in wanted:  # empty stand-ins named as pip names wheels: the check reads names only
        name, version = pin.split("==")
        (tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    assert _script("--check-wheels", env={"GPU_CHECK_WHEELS": str(tmp_path)}).returncode == 0
    (tmp_path / "ray-2.59.0-py3-none-any.whl").write_bytes(b"")  # two versions of one package
    done = _script("--check-wheels", env={"GPU_CHECK_WHEELS": str(tmp_path)})
    assert done.returncode == 3 and "remove those" in done.stderr
    (tmp_path / "ray-2.59.0-py3-none-any.whl").unlink()
    (tmp_path / "webdataset-1.0.2-py3-none-any.whl").unlink()
    done = _script("--check-wheels", env={"GPU_CHECK_WHEELS": str(tmp_path)})
    assert done.returncode == 3 and "webdataset==1.0.2 (0 wheels)" in done.stderr


def test_slimming_a_wheel_drops_the_parts_and_their_record_lines_and_keeps_modes(tmp_path):
    from benchmarks.gpu_wheels import pin_key, slim, wheel_key

    wheel = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ("ray/__init__.py", "ray/jars/ray_dist.jar", "ray/rllib/algo.py", "ray/core/raylet"):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | (0o755 if name.endswith("raylet") else 0o644)) << 16
            z.writestr(info, b"x" * 1000)
        z.writestr("ray-2.60.0.dist-info/RECORD", "ray/__init__.py,,\nray/jars/ray_dist.jar,,\n"
                                                  "ray/rllib/algo.py,,\nray/core/raylet,,\n")
    slim(wheel)
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["ray-2.60.0.dist-info/RECORD", "ray/__init__.py", "ray/core/raylet"]
        assert z.read("ray-2.60.0.dist-info/RECORD").decode().split() == ["ray/__init__.py,,", "ray/core/raylet,,"]
        assert (z.getinfo("ray/core/raylet").external_attr >> 16) & 0o111  # still executable
    assert wheel_key(wheel.name) == pin_key("ray==2.60.0")
    assert wheel_key("grpcio_health_checking-1.85.1-py3-none-any.whl") == pin_key("grpcio-health-checking==1.85.1")


def test_a_section_that_never_finished_fails_the_report_and_says_why(tmp_path):
    from benchmarks.gpu_check.report import combine, write_report
    from benchmarks.gpu_check.run import section_path

    section_path(tmp_path, "machine").parent.mkdir(parents=True)
    section_path(tmp_path, "machine").write_text(json.dumps({"section": "machine", "status": "ok", "summary": "m"}))
    section_path(tmp_path, "teacher").with_suffix(".rc").write_text("124\n")
    doc = combine(tmp_path)
    assert doc["verdict"] == "FAILED" and doc["broken_sections"] == ["teacher"]
    assert doc["sections"]["teacher"]["error"] == "timed out" and doc["sections"]["losses"]["status"] == "not run"
    assert write_report(tmp_path) == 1 and "RESULT: FAILED" in (tmp_path / "gpu_check.md").read_text()


def test_the_checks_can_fail():
    """A gather that returns another rank's rows, a loss off by 1 %, a missing gradient."""
    from benchmarks.gpu_check.gather import differences, expected
    from benchmarks.gpu_check.losses import relative_error

    want = expected()
    wrong = [dict(r) for r in want]
    wrong[1]["no_grad"] = wrong[1]["no_grad"].flip(0)
    assert differences(want, want) == [] and differences(wrong, want) == ["rank 1: no_grad"]
    value = [torch.tensor(2.0), torch.ones(3)]
    assert relative_error(value, value) == 0.0
    assert relative_error([torch.tensor(2.02), torch.ones(3)], value) == pytest.approx(0.01, rel=1e-3)
    assert relative_error([torch.tensor(2.0), None], value) == math.inf


def test_config_overrides_are_checked_fields():
    from benchmarks.gpu_check.__main__ import config_from, parse_args

    cfg = config_from(parse_args(["--out", "x", "--set", "student_steps=5", "--set", "teacher=ViT-B-16", "teacher"]))
    assert cfg.student_steps == 5 and cfg.teacher == "ViT-B-16" and not cfg.dry_run
    with pytest.raises(SystemExit, match="FIELD=JSON"):
        config_from(parse_args(["--out", "x", "--set", "no_such_field=1", "teacher"]))
    with pytest.raises(SystemExit, match="gpu_share"):
        config_from(parse_args(["--out", "x", "--set", "gpu_share=0.9", "teacher"]))
