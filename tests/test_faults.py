"""Faults on a live pool: a teacher replica killed while a student run trains against it."""
from __future__ import annotations

import threading
import time

import pytest

from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig
from teacher_service.config import TeacherConfig
from tiny_models import running_app, tiny_teacher_overrides, train_shards

pytestmark = pytest.mark.ray

APP = "kd-teacher-faults"
BATCH = 16
STEPS = 10
EPOCHS = 3
TEACHER = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), app_name=APP, num_replicas=2,
                        num_cpus=0.25, torch_threads=1, max_batch_size=64, expected_request_samples=BATCH)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return train_shards(tmp_path_factory)


def run_cfg(shards: str, storage, name: str) -> TrainConfig:
    return TrainConfig(run_name=name, storage_path=str(storage), model=ModelConfig(name="digits-student"),
                       data=DataConfig(train_shards=shards, image_size=32, batch_size=BATCH, shuffle_buffer=50),
                       teacher=TeacherSourceConfig(mode="remote", app_name=APP, prefetch=2, timeout_s=20, retries=3,
                                                   coalesce=False),
                       losses={"clip": 1.0, "kl": 1.0, "fd": 100.0}, optim=OptimConfig(lr=1e-3, warmup_steps=1),
                       epochs=EPOCHS, max_steps_per_epoch=STEPS, num_workers=1, cpus_per_worker=1, torch_threads=1,
                       log_every_steps=0, seed=0)


def replica_actors(app: str) -> list:
    import ray

    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def test_replicas_killed_mid_run_lose_and_repeat_no_step(shards, ray_cluster, tmp_path):
    """Kill both replicas while the run is being answered: the run finishes every step, asked
    the teacher exactly once per batch it trained on, and ends with the same loss as an
    uninterrupted run of the same seed (the teacher is seeded: every replica gives the same features)."""
    import ray

    from student_trainer.train import run_training
    from teacher_service.deployment import collect_stats

    with running_app(TEACHER) as handle:
        control = run_training(run_cfg(shards, tmp_path / "runs", "control")).metrics
        outcome: dict = {}
        cfg = run_cfg(shards, tmp_path / "runs", "killed")
        runner = threading.Thread(target=lambda: outcome.update(metrics=run_training(cfg).metrics), daemon=True)
        runner.start()
        deadline = time.monotonic() + 120
        victims = replica_actors(APP)
        assert len(victims) == 2
        while (answered := collect_stats(handle)["runs"].get("killed", {}).get("samples", 0)) < 2 * BATCH:
            assert time.monotonic() < deadline, "the run never reached the teacher"
            time.sleep(0.05)
        for victim in victims:  # the whole pool at once: Serve starts new replicas, callers wait or re-send
            ray.kill(victim, no_restart=False)
        runner.join(timeout=300)
        assert not runner.is_alive() and "metrics" in outcome
    killed = outcome["metrics"]
    assert answered < EPOCHS * STEPS * BATCH / 2  # the kill really came mid-run
    assert killed["step"] == control["step"] == EPOCHS * STEPS
    assert killed["teacher_samples"] == EPOCHS * STEPS * BATCH  # each batch asked once (re-sends count as retries)
    assert killed["loss"] == pytest.approx(control["loss"], rel=1e-6, abs=1e-6)
    print(f"replicas killed after {answered} of {EPOCHS * STEPS * BATCH} samples: "
          f"{killed['teacher_retries']} retried call(s), {killed['teacher_wait_s']:.1f} s waiting; final loss {killed['loss']:.6f} "
          f"vs uninterrupted {control['loss']:.6f}")
