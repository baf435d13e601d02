"""Tiny open_clip architectures shared by the tests (random init, fast on a 2-core CPU)."""
from __future__ import annotations

import contextlib


def tiny_teacher_overrides(embed_dim: int = 48) -> dict:
    """open_clip `create_model` overrides for a ViT-B-32-shaped teacher at 32 px; a fresh dict each call.

    embed_dim 48 differs from the `digits-student` preset's 64, so D_s != D_t paths (projections) run.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def shared_teacher():
    """The config of the session's shared tiny teacher app (tests/conftest.py: `tiny_teacher_app`),
    for the tests that only read from a teacher: they count by run name or by differences, never
    from the app's start. One replica, `tiny_teacher_overrides()` at seed 0."""
    from teacher_service.config import ServingConfig, TeacherConfig

    return TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1,
                         serving=ServingConfig(app_name="kd-teacher-tiny-shared", num_cpus=0.5, max_batch_size=64,
                                               expected_request_samples=16))


@contextlib.contextmanager
def running_app(cfg):
    """Deploy the teacher app `cfg` on the session's cluster, yield its handle once it answers, delete it after."""
    from ray import serve

    from teacher_service.app import deploy

    handle = deploy(cfg)
    handle.info.remote().result(timeout_s=120)
    try:
        yield handle
    finally:
        serve.delete(cfg.serving.app_name)


def tiny_app_config(app: str, dim: int, request_samples: int):
    """A tiny teacher app (`tiny_teacher_overrides(dim)`) on a quarter CPU, batching up to 64 samples."""
    from teacher_service.config import ServingConfig, TeacherConfig

    return TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(dim), torch_threads=1,
                         serving=ServingConfig(app_name=app, num_cpus=0.25, max_batch_size=64,
                                               expected_request_samples=request_samples))


def train_shards(tmp_path_factory, samples_per_shard: int = 100, name: str = "digits") -> str:
    """Two digits train shards of `samples_per_shard` samples, as a brace spec (what `kd train` takes)."""
    from student_trainer.data.write_shards import write_digits_shards

    out = tmp_path_factory.mktemp(name)
    write_digits_shards(out, image_size=32, samples_per_shard=samples_per_shard)
    return str(out / "train-{000000..000001}.tar")
