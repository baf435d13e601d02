"""Shared fixtures: one local Ray cluster for the whole test session (ray-notes.md)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, so every run outlives its last
# step by up to 2 s (about 3 s a run here, measured): the suite trains ~80 short runs. Set before
# ray.init so the session's cluster, its controllers and `kd` subprocesses all see it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with oversubscribed logical CPUs, shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # our own, even when another cluster runs on this machine
            num_cpus=8,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            log_to_driver=False,
        )
        # Serve starts with the first teacher_service.app.deploy(), without HTTP proxies: no port to clash on
    yield ray
    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
