"""The student training path end to end on the shared local Ray cluster.

One tiny teacher app (embed_dim 48, so the FD projection to the student's 64 is exercised) serves
every remote run of this module; digits shards are written once. The first run and its resume are
module fixtures, read by the tests in any order; the run with an inline teacher is
tests/test_methods_training.py's.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig
from teacher_service.config import ServingConfig, TeacherConfig
from tiny_models import tiny_teacher_overrides

pytestmark = pytest.mark.ray

APP = "kd-teacher-train-integration"
BATCH = 16
STEPS = 3
EVAL_EVERY = 2  # the remote run and its resume evaluate at steps 2, 3 (the last), then 4, 6
TINY_TEACHER = tiny_teacher_overrides()
TEACHER_CFG = TeacherConfig(model="ViT-B-32", overrides=TINY_TEACHER, torch_threads=1,
                            serving=ServingConfig(app_name=APP, num_cpus=0.5, max_batch_size=64,
                                                  expected_request_samples=BATCH))
CHECKPOINT_FILES = ("model.pt", "model_config.json", "train_state.pt")
FD_PROJECTION = "losses.fd.projection.image.weight"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from student_trainer.data.write_shards import write_digits_shards

    out = tmp_path_factory.mktemp("digits")
    write_digits_shards(out, image_size=32, samples_per_shard=100)
    return out


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def teacher_app(ray_cluster, shards):
    """Deploy the tiny teacher once, reading this module's shards (requests by reference); yields
    its info dict; deletes the app afterwards."""
    from ray import serve

    from teacher_service.app import deploy

    handle = deploy(TEACHER_CFG.updated({"serving.shard_roots": [str(shards)]}))
    try:
        yield handle.info.remote().result(timeout_s=120)
    finally:
        serve.delete(APP)
    assert APP not in serve.status().applications


def train_cfg(shards: Path, storage: Path, run_name: str, *, mode: str = "remote", epochs: int = 1,
              workers: int = 2, steps: int = STEPS, losses: dict | None = None, **teacher) -> TrainConfig:
    return TrainConfig(
        run_name=run_name,
        storage_path=str(storage),
        model=ModelConfig(name="digits-student"),
        data=DataConfig(train_shards=str(shards / "train"), val_shards=str(shards / "val"), image_size=32,
                        batch_size=BATCH, shuffle_buffer=50),
        teacher=TeacherSourceConfig(mode=mode, app_name=teacher.pop("app_name", APP),
                                    teacher=TEACHER_CFG if mode == "inline" else None,
                                    **{"timeout_s": 60.0, "retries": 1, "prefetch": 2, "send_pixels": "always",
                                       **teacher}),
        losses=losses or {"clip": 1.0, "kl": 1.0, "fd": 100.0},
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        epochs=epochs,
        max_steps_per_epoch=steps,
        num_workers=workers,
        cpus_per_worker=1,
        torch_threads=1,
        log_every_steps=0,
    )


def checkpoint_state(result) -> tuple[dict[str, torch.Tensor], dict]:
    """(student state dict, train state) of the result's checkpoint, checking every file is there
    and readable by its owner only (weights are a run's output on a possibly shared machine)."""
    stored = Path(result.checkpoint.path)
    exposed = [p.name for p in stored.rglob("*") if p.is_file() and p.stat().st_mode & 0o077]
    assert not exposed, f"checkpoint files readable by other users: {exposed}"
    with result.checkpoint.as_directory() as d:
        for name in CHECKPOINT_FILES:
            assert (Path(d) / name).is_file(), f"checkpoint lacks {name}: {sorted(p.name for p in Path(d).iterdir())}"
        return (torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=True),
                torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False))


@pytest.fixture(scope="module")
def first_run(shards, storage, teacher_app):
    from student_trainer.train import run_training

    cfg = train_cfg(shards, storage, "remote-kd")
    cfg.eval_every_steps = EVAL_EVERY  # the evaluation curve, on two DDP workers
    start = time.perf_counter()
    result = run_training(cfg)
    return cfg, result, checkpoint_state(result), time.perf_counter() - start


def test_remote_distillation_run(first_run, teacher_app):
    from ray import serve

    cfg, result, (state, train_state), seconds = first_run
    m = result.metrics
    assert m["epoch"] == 1 and m["step"] == STEPS and m["world_size"] == 2
    assert m["teacher_mode"] == "remote" and m["teacher_requests"] == STEPS and m["teacher_samples"] == STEPS * BATCH
    assert m["teacher_fingerprint"] == teacher_app["fingerprint"]
    for name in ("loss", "clip_loss", "kl_loss", "fd_loss"):
        assert math.isfinite(m[name]) and m[name] > 0, (name, m[name])
    assert m["loss"] == pytest.approx(m["clip_loss"] + m["kl_loss"] + m["fd_loss"], rel=1e-4)
    # the step profile (rank 0's): every part measured, together no more than the epoch took
    profile = {p: m[f"step_{p}_ms"] for p in ("data", "teacher_wait", "convert", "compute", "other")}
    assert all(v >= 0 for v in profile.values()) and profile["compute"] > 0, profile
    assert sum(profile.values()) * STEPS / 1000 <= m["epoch_time_s"] + 1e-3, (profile, m["epoch_time_s"])
    assert teacher_app["embed_dim"] == 48 and state["text_projection"].shape[1] == 64
    assert train_state["losses"][FD_PROJECTION].shape == (48, 64)  # FD projects 64 -> 48, checkpointed
    assert (train_state["next_epoch"], train_state["next_epoch_step"], train_state["step"]) == (1, 0, STEPS)
    stats = serve.get_app_handle(APP).stats.remote().result(timeout_s=30)
    assert stats["requests"] >= 2 * STEPS and stats["samples"] == BATCH * stats["requests"]  # both ranks asked
    assert stats["errors"] == 0
    # the evaluation curve: both ranks at steps 2 and 3; teacher-seconds are the pool's forward
    # seconds its answers carried, summed over both ranks (no more than the pool computed)
    points = m["eval_curve"]
    assert [p["step"] for p in points] == [EVAL_EVERY, STEPS]
    assert [p["samples_seen"] for p in points] == [EVAL_EVERY * 2 * BATCH, STEPS * 2 * BATCH]
    assert 0 < points[0]["teacher_s"] < points[1]["teacher_s"] <= m["teacher_s"] <= stats["forward_s"] + 1e-6
    assert m["zero_shot_top1"] == points[-1]["zero_shot_top1"] and train_state["clocks"]["teacher_s"] == m["teacher_s"]
    print(f"first remote run: {seconds:.1f}s")


@pytest.fixture(scope="module")
def resumed_run(first_run, shards, storage):
    from student_trainer.train import run_training

    cfg = train_cfg(shards, storage, first_run[0].run_name, epochs=2)
    cfg.eval_every_steps = EVAL_EVERY
    result = run_training(cfg)
    return result, checkpoint_state(result)


def test_rerun_with_same_name_resumes(first_run, resumed_run, teacher_app):
    _, _, (first_state, first_train_state), _ = first_run
    result, (state, train_state) = resumed_run
    m = result.metrics
    assert m["epoch"] == 2 and m["step"] == 2 * STEPS  # continued from the checkpoint, not restarted
    # teacher stats count from process start: a restart from scratch would have asked 2 * STEPS times
    assert m["teacher_requests"] == STEPS
    assert m["teacher_fingerprint"] == teacher_app["fingerprint"]
    assert state.keys() == first_state.keys()
    changed = [k for k in state if not torch.equal(state[k], first_state[k])]
    assert "text_projection" in changed and len(changed) > len(state) // 2
    assert (train_state["next_epoch"], train_state["next_epoch_step"], train_state["step"]) == (2, 0, 2 * STEPS)
    assert not torch.equal(train_state["losses"][FD_PROJECTION], first_train_state["losses"][FD_PROJECTION])
    # the curve goes on across the resume: the first run's points, then the resumed run's, the
    # clocks continuing from the checkpoint's
    points = m["eval_curve"]
    assert [p["step"] for p in points] == [2, 3, 4, 6] and points[:2] == first_run[1].metrics["eval_curve"]
    assert [p["samples_seen"] for p in points] == [s * 2 * BATCH for s in (2, 3, 4, 6)]
    for clock in ("train_wall_s", "teacher_s"):
        assert all(a[clock] < b[clock] for a, b in zip(points, points[1:])), clock


def test_checkpoint_loads_and_evaluates(resumed_run, shards):
    from student_trainer.checkpoint import load_student
    from student_trainer.evaluate import evaluate_checkpoint

    result, (state, _) = resumed_run
    with result.checkpoint.as_directory() as d:
        model, model_cfg = load_student(d)
        assert model_cfg.name == "digits-student" and not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        metrics = evaluate_checkpoint(d, str(shards / "val"), limit=100)
        whole = evaluate_checkpoint(d, str(shards / "val"))
    assert metrics["samples"] == 100
    # the last point of the curve, each of two ranks embedding half the split, says what one process says
    for name in ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r1"):
        assert result.metrics[name] == pytest.approx(whole[name], abs=1.01 / whole["samples"]), name
    for name in ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r10"):
        assert 0.0 <= metrics[name] <= 1.0, (name, metrics[name])
    assert metrics["zero_shot_top1"] <= metrics["zero_shot_top5"]


def test_resume_with_another_teacher_is_refused(first_run, resumed_run, shards, storage):
    from student_trainer.train import run_training

    cfg = train_cfg(shards, storage, first_run[0].run_name, mode="none", epochs=3, workers=1,
                    losses={"clip": 1.0})
    cfg.max_failures = 0  # a refused resume is refused again on every restart: no need to watch it twice
    with pytest.raises(Exception, match="cannot resume run .* it was distilled from teacher fingerprint"):
        run_training(cfg)


def test_missing_teacher_app_fails_fast(shards, storage, ray_cluster):
    from student_trainer.train import run_training

    missing = "kd-teacher-does-not-exist"
    cfg = train_cfg(shards, storage, "remote-missing", workers=1, app_name=missing, timeout_s=3.0, retries=0)
    start = time.perf_counter()
    with pytest.raises(Exception, match=missing):
        run_training(cfg)
    assert time.perf_counter() - start < 90


def test_bad_samples_are_skipped_and_counted_in_epoch_metrics(tmp_path, storage, ray_cluster):
    """Two shards of 40 with 4 bad samples each, one cut short: 2 ranks train to the end and the
    epoch metrics carry the skips by reason, summed over the ranks."""
    from shard_builders import good_sample, png, write_tar

    from student_trainer.train import run_training

    bad = {"missing_caption": {"png": png(32, 32)}, "undecodable_image": {"png": b"not a png", "txt": b"x"},
           "truncated_image": {"png": png(32, 32)[:200], "txt": b"x"}, "empty_caption": {"png": png(), "txt": b" "}}
    for index in range(2):
        good = [good_sample(i, f"g{index}-") for i in range(36)]
        write_tar(tmp_path / f"train-{index:06d}.tar", good[:18] + [(f"bad{index}-{r}", m) for r, m in bad.items()]
                  + good[18:])
    data = (tmp_path / "train-000001.tar").read_bytes()
    cut = data.rstrip(b"\0")  # the last member ends here: cut inside it
    (tmp_path / "train-000001.tar").write_bytes(data[: len(cut) - 5])
    cfg = train_cfg(tmp_path, storage, "bad-samples", mode="none", losses={"clip": 1.0})
    m = run_training(cfg).metrics
    assert m["step"] == 2 and math.isfinite(m["loss"])  # 81 samples counted: 40 per rank, 2 batches of 16
    assert {k: v for k, v in m.items() if k.startswith("data_skipped_") and v} == {
        "data_skipped_missing_caption": 2, "data_skipped_undecodable_image": 2, "data_skipped_truncated_image": 2,
        "data_skipped_empty_caption": 2, "data_skipped_corrupt_tar": 1, "data_skipped_total": 9}
    assert m["data_caption_truncated"] == 0
    scalars = event_scalars(storage / "bad-samples")  # the event file counts the skips by reason too
    assert scalars["epoch/data_skipped_total"] == [(2, 9)] and scalars["epoch/data_skipped_corrupt_tar"] == [(2, 1)]


def test_run_by_reference_trains_like_the_pixel_run(first_run, shards, storage, teacher_app):
    """The same run with `send_pixels: auto` against a teacher that reads the shards: every sample
    goes by reference, the replica regenerates and checks each view, and the run trains to the
    loss of the pixel run (`first_run`, same seed and data)."""
    from ray import serve

    from student_trainer.train import run_training

    before = serve.get_app_handle(APP).stats.remote().result(timeout_s=30)
    m = run_training(train_cfg(shards, storage, "remote-kd-byref", send_pixels="auto")).metrics
    pixels = first_run[1].metrics
    assert m["teacher_samples_by_reference"] == m["teacher_samples"] == STEPS * BATCH
    assert pixels["teacher_samples_by_reference"] == 0
    for name in ("loss", "clip_loss", "kl_loss", "fd_loss"):
        assert m[name] == pytest.approx(pixels[name], rel=1e-5), name
    after = serve.get_app_handle(APP).stats.remote().result(timeout_s=30)
    assert after["reference_samples"] - before.get("reference_samples", 0) >= STEPS * BATCH
    assert after["reference_refused"] == 0


def event_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard event files: tag -> [(step, value)], read back the way
    TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files, f"no event files under {run_dir / 'tensorboard'}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in files:  # one file per process that trained: the first run, then its resume
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def test_event_files_hold_every_curve_across_a_resume(first_run, resumed_run, storage):
    from student_trainer.events import log_eval

    cfg = first_run[0]
    log_eval(str(storage / cfg.run_name / "tensorboard"), 5, {"zero_shot_top1": 0.25, "i2t_r1": 0.125})
    scalars = event_scalars(storage / cfg.run_name)
    every_step = list(range(1, 2 * STEPS + 1))  # 3 steps, then 3 more after the resume: one curve
    for tag in ("train/loss", "train/clip_loss", "train/kl_loss", "train/fd_loss", "train/lr", "train/logit_scale",
                "train/samples_per_s", "train/teacher_wait_s"):
        assert [step for step, _ in scalars[tag]] == every_step, tag
    total = dict(scalars["train/loss"])
    parts = [dict(scalars[f"train/{name}_loss"]) for name in ("clip", "kl", "fd")]
    assert total[1] == pytest.approx(sum(p[1] for p in parts), rel=1e-4)
    assert dict(scalars["train/logit_scale"])[1] == pytest.approx(1 / 0.07, rel=0.01)
    for tag in ("epoch/teacher_requests", "epoch/teacher_samples", "epoch/teacher_retries", "epoch/teacher_wait_s",
                "epoch/data_skipped_total", "epoch/train_samples_per_s", "epoch/run_samples_per_s",
                "epoch/step_compute_ms", "epoch/step_teacher_wait_ms"):
        assert [step for step, _ in scalars[tag]] == [STEPS, 2 * STEPS], tag  # one point per epoch
    assert dict(scalars["epoch/teacher_requests"])[STEPS] == STEPS
    # the curve's points (steps 2, 3, then 4, 6), and a `kd eval` joined at step 5
    assert sorted(step for step, _ in scalars["eval/zero_shot_top1"]) == [2, 3, 4, 5, 6]
    assert (5, 0.25) in scalars["eval/zero_shot_top1"] and (5, 0.125) in scalars["eval/i2t_r1"]


def _kd_train(shards: Path, storage: Path, run_name: str, *flags: str) -> subprocess.Popen:
    """`kd train` as a user runs it (a process of its own, attached to the session's cluster),
    with a per-step line asked for every step; stdout and stderr together."""
    import ray

    cfg = train_cfg(shards, storage, run_name, mode="none", losses={"clip": 1.0})
    cfg.log_every_steps = 1
    cfg.to_yaml(storage / f"{run_name}.yaml")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", str(storage / f"{run_name}.yaml"),
           "--address", ray.get_runtime_context().gcs_address, *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root)


def test_kd_train_shows_progress_not_per_step_logs_unless_verbose(shards, storage, ray_cluster):
    """Without --verbose: a progress line and a summary, none of Ray Train's per-report metric
    dicts or the workers' per-step lines (both ranks would print them); with it, both come back."""
    runs = {"console-quiet": _kd_train(shards, storage, "console-quiet"),
            "console-verbose": _kd_train(shards, storage, "console-verbose", "--verbose")}
    out = {name: proc.communicate(timeout=600)[0] for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 0, out[name][-4000:]
    quiet, verbose = out["console-quiet"], out["console-verbose"]
    per_step = r"\[{}\] epoch 1/1 step \d/{} loss \d"
    assert "Reporting training result" not in quiet, quiet
    assert not re.search(per_step.format("console-quiet", STEPS), quiet), quiet
    assert re.search(rf"\[console-quiet\] epoch 1/1 step \d/{STEPS} \| [\d.]+ samples/s \| loss [\d.]+ \| "
                     r"teacher wait [\d.]+s \(\d+%\) \| ETA", quiet), quiet
    assert re.search(r"\[console-quiet\] done in .*TensorBoard: tensorboard --logdir .*console-quiet/tensorboard",
                     quiet), quiet
    assert verbose.count("Reporting training result") >= 2, verbose  # one per rank
    assert re.search(per_step.format("console-verbose", STEPS), verbose), verbose
    print(f"kd train output: {len(quiet.splitlines())} lines quiet, {len(verbose.splitlines())} with --verbose")
