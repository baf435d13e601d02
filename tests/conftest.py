"""Shared fixtures: one local Ray cluster for the whole test session (ray-notes.md)."""
from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        from ray import serve

        # Serve fixes its HTTP proxy's port when it first starts on a cluster: a free one, so
        # sessions running side by side on one machine do not clash on 8000.
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    yield ray
    if ray.is_initialized():
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
