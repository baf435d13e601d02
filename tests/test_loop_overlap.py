"""The training loop hides each epoch's first teacher answers behind its own set-up work: an
epoch's stream opens eagerly (its first prefetch window sent to the pool) before the student is
created and the module, the optimizer and DDP are built (the first epoch), or before the previous
epoch's checkpoint is written (every later one). The loop runs in this process with Ray Train's worker calls replaced
by recorders, so the order is observed, not timed."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig
from student_trainer.teacher.outputs import TeacherOutputs
from student_trainer.teacher.sources import TeacherSource, TeacherStats
from teacher_service.app import TeacherUnavailableError

TEACHER_DIM = 48


class RecordingSource(TeacherSource):
    """A pool-like source that logs when a stream is opened and whether eagerly."""

    mode, can_lose_teacher = "remote", True
    embed_dim = TEACHER_DIM
    info = {"fingerprint": "fp-recorded", "model": "recorded", "logit_scale": 50.0, "logit_bias": None}

    def __init__(self, log: list, lost_at_view: int | None = None) -> None:
        self.log, self.stats, self.lost_at_view = log, TeacherStats(), lost_at_view

    def stream(self, batches, view=None, eager=False):
        self.log.append(("stream", view, eager))
        if view == self.lost_at_view:
            raise TeacherUnavailableError("teacher app 'unused' is gone")
        rng = np.random.default_rng(0)

        def answers():
            for batch in batches:
                self.stats.compute_s += 0.25  # teacher-seconds, as a pool's answers carry them
                rows = rng.standard_normal((len(batch), TEACHER_DIM)).astype(np.float16)
                yield batch, TeacherOutputs(rows, rows.copy(), 50.0, None, self.info["fingerprint"])

        return answers()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from student_trainer.data.write_shards import write_digits_shards

    out = tmp_path_factory.mktemp("digits")
    write_digits_shards(out, image_size=32, samples_per_shard=40)
    return out


def run_loop(monkeypatch, shards, tmp_path, lost_at_view: int | None = None, captured: dict | None = None,
             **changes) -> list:
    """Two epochs of two steps through `train_loop_per_worker`, in this process; the log of what happened, in order.

    `changes`: TrainConfig fields set on top (`eval_every_steps`, `accum_steps`, ...; data.val_shards
    is the digits' val split). `captured` gets the last report's metrics and its checkpoint's weights."""
    import ray.train
    import ray.train.torch

    import student_trainer.progress as progress
    import student_trainer.train as train

    log: list = []

    def create_student(model_cfg, device):
        log.append("student created")
        return real_create_student(model_cfg, device)

    real_create_student = train.create_student
    monkeypatch.setattr(train, "create_student", create_student)

    class LoggedModule(train.DistillModule):
        def __init__(self, *args, **kwargs):
            log.append("module built")
            super().__init__(*args, **kwargs)

    def prepare_model(module):
        log.append("ddp prepared")
        return module

    def report(metrics, checkpoint=None):
        log.append(("report", metrics["epoch"], checkpoint is not None) + (("stopped",) if "stopped" in metrics else ()))
        if captured is not None and checkpoint is not None:
            captured["metrics"] = metrics
            captured["weights"] = torch.load(os.path.join(checkpoint.path, "model.pt"), weights_only=True)

    monkeypatch.setattr(train, "make_teacher_source", lambda *a, **k: RecordingSource(log, lost_at_view))
    monkeypatch.setattr(train, "DistillModule", LoggedModule)
    monkeypatch.setattr(progress, "_find_board", lambda run_name: None)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0,
                                                                          get_world_size=lambda: 1))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", prepare_model)
    cfg = TrainConfig(run_name="overlap", storage_path=str(tmp_path / "runs"), model=ModelConfig(name="digits-student"),
                      data=DataConfig(train_shards=str(shards / "train"), image_size=32, batch_size=8, shuffle_buffer=10),
                      teacher=TeacherSourceConfig(mode="remote", app_name="unused"),
                      losses={"clip": 1.0, "kl": 1.0}, optim=OptimConfig(lr=1e-3, warmup_steps=1), epochs=2,
                      max_steps_per_epoch=2, num_workers=1, torch_threads=1, log_every_steps=0)
    cfg.data.val_shards = str(shards / "val")
    for name, value in changes.items():
        setattr(cfg, name, value)
    umask = os.umask(0o022)
    try:
        train.train_loop_per_worker(cfg.to_dict())
    finally:
        os.umask(umask)  # the loop makes its process's files owner-only; this process is the test session's
    return log


@pytest.mark.slow  # trains: two epochs of the loop, in this process
def test_each_epochs_first_window_goes_out_before_the_work_it_overlaps(monkeypatch, shards, tmp_path):
    assert run_loop(monkeypatch, shards, tmp_path) == [
        ("stream", 0, True), "student created", "module built", "ddp prepared",  # epoch 1's window, then the model
        ("stream", 1, True), ("report", 1, True), ("report", 2, True)]  # epoch 2's window, then epoch 1's checkpoint


@pytest.mark.slow  # trains: two epochs of the loop, in this process
def test_a_teacher_lost_while_the_next_epoch_opens_still_gets_the_epochs_checkpoint(monkeypatch, shards, tmp_path):
    """Opening epoch 2 ahead meets a lost teacher: epoch 1's checkpoint is still written, and the
    loss surfaces at epoch 2's first step, which checkpoints and stops (resumable), as before."""
    assert run_loop(monkeypatch, shards, tmp_path, lost_at_view=1) == [
        ("stream", 0, True), "student created", "module built", "ddp prepared",
        ("stream", 1, True), ("report", 1, True), ("report", 2, True, "stopped")]


@pytest.mark.parametrize("name, overrides", [("digits-student", {}),
                                             ("ViT-S-16", {"force_image_size": 64, "force_context_length": 16})])
def test_the_students_shape_is_the_real_models_and_leaves_the_seed_alone(name, overrides):
    """What the loop sets up before the student exists (tokenizer, loss widths) comes from
    `student_shape`: the same context length and widths as the model created after it, and the
    model's initial weights are those of the seed whether the shape was built first or not."""
    from student_trainer.factory import create_student, embed_dim, student_shape

    cfg = ModelConfig(name=name, overrides=overrides)
    torch.manual_seed(0)
    plain = create_student(cfg)
    torch.manual_seed(0)
    shape = student_shape(cfg)
    after_shape = create_student(cfg)
    assert next(shape.parameters()).device.type == "meta"
    assert (shape.context_length, embed_dim(shape)) == (after_shape.context_length, embed_dim(after_shape))
    for (key, a), b in zip(plain.state_dict().items(), after_shape.state_dict().values()):
        assert torch.equal(a, b), key
