"""Shared fixtures: one local Ray cluster for the whole test session (ray-notes.md)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with oversubscribed logical CPUs, shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            log_to_driver=False,
        )
    yield ray
    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
