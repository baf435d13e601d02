"""The teacher app: deploy, find, inspect and stop a named Serve pool together with its gRPC ingress.

The pool (`serve.deployment`) and the gRPC front door (`grpc.ingress`) are separate concerns; this
module is where the two meet, so neither imports the other. Serve apps outlive the job that
deployed them: one `deploy()` serves every student run that later calls `get_teacher_handle(name)`.
"""
from __future__ import annotations

import time
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from teacher_service.config import TeacherConfig
from teacher_service.contract.protocol import TeacherUnavailableError
from teacher_service.grpc.ingress import ingress_stats, start_ingress, stop_ingress
from teacher_service.serve.deployment import build_app
from teacher_service.stats import add_ingress, merge_stats


def deploy(cfg: TeacherConfig, access_log: bool = True) -> DeploymentHandle:
    """Start (or update) the detached, named teacher app and return its handle once it runs.

    `access_log=False` drops Serve's per-request lines ("CALL embed OK 341.7ms"), which a driver
    that deployed the app would otherwise print once per request (`kd demo` without --verbose);
    requests and latencies stay counted in `collect_stats` and Serve's metrics.

    Serve, when this starts it, runs without HTTP proxies: the pool is reached through handles and
    its own gRPC ingress, so a proxy actor per node would only cost memory and CPU (on a 2-core
    machine, the student's). A Serve instance already running keeps the options it was started with.

    With `cfg.grpc.port` set, also (re)starts the app's gRPC ingress on this node
    (`grpc.ingress.start_ingress`; `grpc.ingress.ingress_address(app)` says where it listens);
    without, stops an ingress a previous deploy of the app started.
    """
    serve.start(proxy_location="Disabled")  # no effect on a Serve instance already running
    handle = serve.run(build_app(cfg), name=cfg.serving.app_name, route_prefix=None, blocking=False,
                       logging_config=None if access_log else {"enable_access_log": False})
    if cfg.grpc.port is not None:
        start_ingress(cfg)
    else:
        stop_ingress(cfg.serving.app_name)
    return handle


def delete_teacher(app_name: str) -> None:
    """Delete the teacher app and stop its gRPC ingress (it would stop by itself within seconds)."""
    stop_ingress(app_name)
    serve.delete(app_name)


def get_teacher_handle(app_name: str = "kd-teacher", timeout_s: float = 60.0) -> DeploymentHandle:
    """Handle to a running teacher app, waiting up to `timeout_s` while it deploys.

    Raises TeacherUnavailableError naming the apps that do run when `app_name` never shows up.
    """
    if not ray.is_initialized():
        raise TeacherUnavailableError("Ray is not initialised: connect with ray.init(address=...) first")
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        app = apps.get(app_name)
        status = str(getattr(app, "status", ""))
        if app is not None and status.endswith("RUNNING"):
            return serve.get_app_handle(app_name)
        if app is not None and status.endswith("DEPLOY_FAILED"):
            raise TeacherUnavailableError(f"teacher app {app_name!r} failed to deploy: {app.message}")
        if time.monotonic() >= deadline:
            running = {name: str(a.status) for name, a in apps.items()}
            raise TeacherUnavailableError(
                f"no running teacher app {app_name!r} after {timeout_s:.0f}s "
                f"(state: {status or 'absent'}); apps on this cluster: {running or 'none'}. "
                f"Deploy it with teacher_service.app.deploy(cfg) or `serve deploy`."
            )
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def collect_stats(handle: DeploymentHandle, timeout_s: float = 30.0) -> dict[str, Any]:
    """Every replica's counters (Serve handle broadcast), merged by `merge_stats`, plus the refusals
    of the app's gRPC ingress when it has one (`stats.add_ingress`).

    Replicas that fail to answer are counted in `replicas_failed` rather than failing the call.
    """
    answers = handle.broadcast("stats", include_samples=True).results(timeout_s=timeout_s, return_exceptions=True)
    snapshots = [a for a in answers if isinstance(a, dict)]
    if not snapshots:
        raise TeacherUnavailableError(f"no teacher replica answered stats: {answers}")
    merged = merge_stats(snapshots)
    merged["replicas_failed"] = len(answers) - len(snapshots)
    ingress = ingress_stats(handle.app_name, timeout_s)
    return merged if ingress is None else add_ingress(merged, ingress)

