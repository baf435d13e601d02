"""Faults on a live pool and a live run: teacher replicas killed, the whole teacher app gone for
longer than the run's patience (remote stops with a checkpoint and resumes; hybrid carries on from
its cache), and a student worker killed (Ray Train restarts the group at the last checkpoint)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig
from teacher_service.config import ServingConfig, TeacherConfig
from reliability_record import record
from tiny_models import running_app, tiny_teacher_overrides, train_shards

pytestmark = pytest.mark.ray

APP = "kd-teacher-faults"
BATCH = 16
STEPS = 10
EPOCHS = 3
TEACHER = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1,
                        serving=ServingConfig(app_name=APP, num_replicas=2, num_cpus=0.25, max_batch_size=64,
                                              expected_request_samples=BATCH))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return train_shards(tmp_path_factory)


@pytest.fixture(scope="module")
def app(ray_cluster):
    with running_app(TEACHER) as handle:
        yield handle


@pytest.fixture(scope="module")
def control(app, shards, tmp_path_factory):
    """The Result of an uninterrupted 1-worker remote run (what every interrupted run must end at)."""
    from student_trainer.train import run_training

    return run_training(run_cfg(shards, tmp_path_factory.mktemp("control"), "control"))


def run_cfg(shards: str, storage, name: str, **teacher) -> TrainConfig:
    source = {"mode": "remote", "app_name": APP, "prefetch": 2, "timeout_s": 20, "retries": 3, "coalesce": False,
              **teacher}
    return TrainConfig(run_name=name, storage_path=str(storage), model=ModelConfig(name="digits-student"),
                       data=DataConfig(train_shards=shards, image_size=32, batch_size=BATCH, shuffle_buffer=50),
                       teacher=TeacherSourceConfig(**source),
                       losses={"clip": 1.0, "kl": 1.0, "fd": 100.0}, optim=OptimConfig(lr=1e-3, warmup_steps=1),
                       epochs=EPOCHS, max_steps_per_epoch=STEPS, num_workers=1, cpus_per_worker=1, torch_threads=1,
                       log_every_steps=0, seed=0)


def replica_actors(app: str) -> list:
    import ray

    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def in_background(fn) -> tuple[threading.Thread, dict]:
    """Run `fn()` in a thread; the dict gets `value` or `error`."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def checkpoints(storage: Path, run: str) -> list[dict]:
    """metrics.json of every checkpoint the run has persisted so far (rank 0 writes them)."""
    found = []
    for path in sorted((storage / run).glob("checkpoint_*/metrics.json")):
        with contextlib.suppress(OSError, ValueError):  # one being written is read next round
            found.append(json.loads(path.read_text()))
    return found


def registered_checkpoint(storage: Path, run: str) -> dict | None:
    """Metrics of the checkpoint Ray Train has registered as the run's latest (what a restart
    resumes from; a checkpoint a worker has written may take a moment to be registered)."""
    with contextlib.suppress(OSError, ValueError):
        snapshot = json.loads((storage / run / "checkpoint_manager_snapshot.json").read_text())
        return (snapshot.get("latest_checkpoint_result") or {}).get("metrics")
    return None


def samples_answered(handle, run: str) -> int:
    from teacher_service.app import collect_stats

    return collect_stats(handle)["runs"].get(run, {}).get("samples", 0)


def wait_for(predicate, what: str, timeout_s: float = 180.0, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)
    return value


def test_replicas_killed_mid_run_lose_and_repeat_no_step(shards, app, control, tmp_path):
    """Kill both replicas while the run is being answered: the run finishes every step, asked
    the teacher exactly once per batch it trained on, and ends with the same loss as an
    uninterrupted run of the same seed (the teacher is seeded: every replica gives the same features)."""
    import ray

    from student_trainer.train import run_training
    cfg = run_cfg(shards, tmp_path / "runs", "killed")
    runner, outcome = in_background(lambda: run_training(cfg).metrics)
    victims = replica_actors(APP)
    assert len(victims) == 2
    answered = wait_for(lambda: (n := samples_answered(app, "killed")) >= 2 * BATCH and n, "the run to reach the teacher")
    for victim in victims:  # the whole pool at once: Serve starts new replicas, callers wait or re-send
        ray.kill(victim, no_restart=False)
    runner.join(timeout=300)
    assert not runner.is_alive() and "value" in outcome, outcome.get("error")
    killed = outcome["value"]
    assert answered < EPOCHS * STEPS * BATCH / 2  # the kill really came mid-run
    assert killed["step"] == control.metrics["step"] == EPOCHS * STEPS
    assert killed["teacher_samples"] == EPOCHS * STEPS * BATCH  # each batch asked once (re-sends count as retries)
    assert killed["loss"] == pytest.approx(control.metrics["loss"], rel=1e-6, abs=1e-6)
    record("replicas_killed_mid_run", {"samples_answered_before_kill": answered, "samples": EPOCHS * STEPS * BATCH,
                                       "steps": killed["step"], "teacher_samples": killed["teacher_samples"],
                                       "teacher_retries": killed["teacher_retries"],
                                       "teacher_wait_s": round(killed["teacher_wait_s"], 2),
                                       "final_loss": killed["loss"], "final_loss_uninterrupted": control.metrics["loss"]})
    print(f"replicas killed after {answered} of {EPOCHS * STEPS * BATCH} samples: "
          f"{killed['teacher_retries']} retried call(s), {killed['teacher_wait_s']:.1f} s waiting; final loss {killed['loss']:.6f} "
          f"vs uninterrupted {control.metrics['loss']:.6f}")


def test_teacher_gone_past_patience_checkpoints_stops_and_resumes(shards, control, tmp_path):
    """Delete the whole app mid-run: after `patience_s` the run checkpoints at the first step it
    could not train and stops with a message saying so; with the app back, rerunning the same
    name resumes at that step and ends exactly where the uninterrupted run ends."""
    from ray import serve

    from student_trainer.train import run_training
    from teacher_service.app import TeacherUnavailableError, deploy

    gone = TEACHER.updated({"serving.app_name": "kd-teacher-gone", "serving.num_replicas": 1})
    storage = tmp_path / "runs"
    cfg = run_cfg(shards, storage, "patient", app_name=gone.serving.app_name, timeout_s=2, retries=1, patience_s=3)
    handle = deploy(gone)
    handle.info.remote().result(timeout_s=120)
    runner, outcome = in_background(lambda: run_training(cfg))
    answered = wait_for(lambda: (n := samples_answered(handle, "patient")) >= 3 * BATCH and n,
                        "the run to reach the teacher")
    serve.delete(gone.serving.app_name)
    gone_at = time.monotonic()
    runner.join(timeout=300)
    assert not runner.is_alive()
    error = outcome.get("error")
    assert isinstance(error, TeacherUnavailableError), outcome
    message = str(error)
    assert "kd-teacher-gone" in message and "patience 3 s" in message and "rerun with run name 'patient'" in message
    stopped = checkpoints(storage, "patient")[-1]
    assert "stopped" in stopped and 0 < stopped["step"] < EPOCHS * STEPS
    assert f"global step {stopped['step']})" in message
    waited = time.monotonic() - gone_at

    deploy(gone).info.remote().result(timeout_s=120)  # the pool is back (same weights, same fingerprint)
    try:
        result = run_training(cfg)
    finally:
        serve.delete(gone.serving.app_name)
    resumed = result.metrics
    assert resumed["resumed_from_step"] == stopped["step"]
    assert resumed["step"] == EPOCHS * STEPS
    worst = weights_gap(result, control)
    assert worst <= 1e-5, f"weights differ from the uninterrupted run's by up to {worst}"
    record("teacher_gone_past_patience", {"samples_answered_before_delete": answered, "patience_s": 3,
                                          "stopped_after_s": round(waited, 1), "stopped_at_step": stopped["step"],
                                          "resumed_from_step": resumed["resumed_from_step"], "steps": resumed["step"],
                                          "max_weight_difference_vs_uninterrupted": worst})
    print(f"app deleted after {answered} samples; the run stopped {waited:.1f} s later at global step "
          f"{stopped['step']}, resumed there: final weights within {worst:.1e} of the uninterrupted run's")


def test_hybrid_run_carries_on_from_its_cache_with_the_teacher_gone(shards, tmp_path):
    """A hybrid run whose views are all cached keeps training after the app is deleted under it:
    no teacher call is needed, none is made, and the run ends normally."""
    from ray import serve

    from student_trainer.train import run_training
    from teacher_service.app import deploy

    gone = TEACHER.updated({"serving.app_name": "kd-teacher-gone-hybrid", "serving.num_replicas": 1})
    storage, cache = tmp_path / "runs", str(tmp_path / "cache")

    def hybrid(name: str, epochs: int, **extra) -> TrainConfig:
        cfg = run_cfg(shards, storage, name, mode="hybrid", cache_path=cache, app_name=gone.serving.app_name,
                      timeout_s=2, retries=1, patience_s=3)
        # one view, and batches of 25 that cover all 200 samples every epoch: after one epoch, every
        # sample of every later epoch is a cache hit
        cfg.data.num_views, cfg.data.batch_size = 1, 25
        return dataclasses.replace(cfg, epochs=epochs, max_steps_per_epoch=None, **extra)

    deploy(gone).info.remote().result(timeout_s=120)
    try:
        filled = run_training(hybrid("fill", 1)).metrics
        runner, outcome = in_background(lambda: run_training(hybrid("cached", 4, checkpoint_every_steps=2)).metrics)
        wait_for(lambda: checkpoints(storage, "cached"), "the cached run's first checkpoint")
    finally:
        serve.delete(gone.serving.app_name)
    assert runner.is_alive(), "the run ended before the app was gone: nothing was shown"
    runner.join(timeout=300)
    assert "value" in outcome, outcome.get("error")
    metrics = outcome["value"]
    assert filled["teacher_samples"] == 200 and filled["step"] == 8
    assert metrics["step"] == 4 * 8 and metrics["teacher_samples"] == 0
    record("hybrid_teacher_gone", {"steps": metrics["step"], "teacher_samples_after_fill": metrics["teacher_samples"],
                                   "fill_teacher_samples": filled["teacher_samples"]})
    print(f"hybrid run trained {metrics['step']} steps from its cache; the app was deleted after its first checkpoint")


def train_worker_pids() -> list[int]:
    """PIDs of this session's Ray Train workers (children of our raylet only: other Ray sessions on
    the machine are left alone)."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [p.pid for p in psutil.Process(raylet).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def test_student_worker_killed_restarts_at_the_last_checkpoint(shards, app, tmp_path):
    """SIGKILL one of two DDP workers mid-epoch: Ray Train (FailureConfig) restarts the group, the
    run resumes at the last mid-epoch checkpoint with each rank's data position, and it ends with
    the weights' loss of an uninterrupted run (nothing skipped, nothing trained twice)."""
    from student_trainer.train import run_training

    storage = tmp_path / "runs"

    def two_workers(name: str, **extra) -> TrainConfig:
        return dataclasses.replace(run_cfg(shards, storage, name), num_workers=2, epochs=2, **extra)

    control_result = run_training(two_workers("control-2"))
    control_2 = control_result.metrics
    cfg = two_workers("worker-killed", checkpoint_every_steps=3, max_failures=1)
    runner, outcome = in_background(lambda: run_training(cfg))
    mid_epoch = wait_for(lambda: (c := registered_checkpoint(storage, cfg.run_name)) and c["epoch"] == 2
                         and c["epoch_step"] and c, "a registered mid-epoch checkpoint in epoch 2")
    victims = train_worker_pids()
    assert len(victims) >= 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    runner.join(timeout=300)
    assert "value" in outcome, outcome.get("error")
    metrics = outcome["value"].metrics
    per_epoch = control_2["step"] // 2  # 100 samples per rank: 6 steps of 16
    resumed = metrics["resumed_from_step"]
    assert per_epoch < resumed < 2 * per_epoch  # restarted inside epoch 2...
    assert resumed >= mid_epoch["step"]  # ...at the latest registered checkpoint (or a later one)
    assert metrics["step"] == control_2["step"] and metrics["epoch_step"] == per_epoch
    # the epoch's mean loss covers only the steps after the restart; the weights cover all of them
    worst = weights_gap(outcome["value"], control_result)
    assert worst <= 1e-5, f"weights differ from the uninterrupted run's by up to {worst}"
    record("student_worker_killed", {"checkpoint_step_before_kill": mid_epoch["step"], "resumed_from_step": resumed,
                                     "steps_per_epoch": per_epoch, "steps": metrics["step"],
                                     "max_weight_difference_vs_uninterrupted": worst})
    print(f"worker killed after the checkpoint at step {mid_epoch['step']}: group restarted at step "
          f"{resumed} (epoch 2, step {resumed - per_epoch} of {per_epoch}); final weights within {worst:.1e} "
          f"of the uninterrupted run's")


def weights_gap(result, reference) -> float:
    """Largest absolute difference between two runs' final student weights."""
    import torch

    from student_trainer.checkpoint import MODEL_FILE

    def weights(r) -> dict:
        with r.checkpoint.as_directory() as d:
            return torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)

    a, b = weights(result), weights(reference)
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
