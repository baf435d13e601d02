"""Shared fixtures: one local Ray cluster for the whole test session (ray-notes.md), and the rule
that keeps the quick tier quick: a test that starts Ray is marked `ray`.

Every test that uses a fixture starting Ray (RAY_FIXTURES, directly or through other fixtures) is
marked `ray` here; any other test that tries to start or join Ray (ray.init, `ray start`, a Ray
Train or Serve run, in this process or a child) fails, naming the mark (tests/ray_guard).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, so every run outlives its last
# step by up to 2 s (about 3 s a run here, measured): the suite trains ~80 short runs. Set before
# ray.init so the session's cluster, its controllers and `kd` subprocesses all see it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each run also starts a PreemptionWatcher actor, a process of its own (started, Ray imported) that
# waits for node drains, which no test makes: the suite's runs go without it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

RAY_FIXTURES = {"ray_cluster"}  # fixtures that start Ray: a test using one (even indirectly) is marked `ray`
GUARD_SITE = Path(__file__).with_name("ray_guard")


def _load_guard():
    spec = importlib.util.spec_from_file_location("kd_tests_ray_guard", GUARD_SITE / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ray_guard = _load_guard()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


def pytest_configure(config):
    config.ray_guard_reports = Path(tempfile.mkdtemp(prefix="kd-ray-guard-"))


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "ray_guard_reports", ""), ignore_errors=True)


def _forbid_ray_unless_marked(item):
    """Around one phase (setup, call, teardown) of a test not marked `ray`: Ray refuses to start,
    here and in child processes; an attempt fails the test even if something caught the error."""
    if item.get_closest_marker("ray"):
        return (yield)
    report = item.config.ray_guard_reports / "attempts.txt"
    saved = {name: os.environ.get(name) for name in (ray_guard.RAY_FORBIDDEN, "PYTHONPATH")}
    os.environ[ray_guard.RAY_FORBIDDEN] = str(report)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD_SITE), saved["PYTHONPATH"]]))
    try:
        result = yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        attempts = report.read_text() if report.exists() else ""
        report.unlink(missing_ok=True)
    if attempts:
        pytest.fail(attempts, pytrace=False)
    return result


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_forbid_ray_unless_marked)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_forbid_ray_unless_marked)
pytest_runtest_teardown = pytest.hookimpl(wrapper=True)(_forbid_ray_unless_marked)


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


@pytest.fixture(scope="session")
def tiny_teacher_app(ray_cluster):
    """The tiny teacher app of tiny_models.shared_teacher(), deployed once for the session (a
    deploy costs seconds) and shared by the tests that only read from it; its handle."""
    from tiny_models import running_app, shared_teacher

    with running_app(shared_teacher()) as handle:
        yield handle
