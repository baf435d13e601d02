"""The teacher as a Ray Serve deployment: a detached, named replica pool with sample-counted batching.

Serve apps outlive the job that deployed them, so one `deploy()` serves every student run that
later calls `get_teacher_handle(app_name)`. Requests are validated before they join a batch (a bad
request fails alone); the batch itself is `TeacherEngine.embed_many`, run in a single worker
thread so the event loop keeps queueing the next batch while the current one computes.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from .config import TeacherConfig
from .engine import TeacherEngine
from .model import load_teacher
from .protocol import EmbedRequest, EmbedResponse, RequestLimits


class TeacherUnavailableError(RuntimeError):
    """No running teacher app of the requested name."""


def count_samples(requests: list) -> int:
    """Serve `batch_size_fn`: a batch is sized in samples, each request being a mini-batch."""
    return sum(len(r) for r in requests)


@serve.deployment
class TeacherDeployment:
    """One replica: a frozen teacher, its engine, and a `@serve.batch` queue sized from the config."""

    def __init__(self, config: dict):
        self.cfg = TeacherConfig.from_dict(config)
        self.teacher = load_teacher(self.cfg)
        self.engine = TeacherEngine(self.teacher, RequestLimits(max_samples=self.cfg.max_request_samples))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-forward")
        self._embed_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._started = time.time()

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        """Embed one mini-batch; a RequestError goes to this caller only.

        A request larger than max_batch_size would be refused by Serve's batch queue, so it runs as
        a batch of its own.
        """
        self.engine.validate(request)
        if len(request) > self.cfg.max_batch_size:
            result = (await self._run_batch([request]))[0]
        else:
            result = await self._embed_batch(request)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=count_samples)
    async def _embed_batch(self, requests: list[EmbedRequest]) -> list:
        return await self._run_batch(list(requests))

    async def _run_batch(self, requests: list[EmbedRequest]) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.embed_many, requests)

    async def info(self) -> dict[str, Any]:
        """Teacher identity (fingerprint, sizes, scales) and the limits clients must respect."""
        return {**self.teacher.info(), "app_name": self.cfg.app_name,
                "max_batch_size": self.cfg.max_batch_size,
                "max_request_samples": self.cfg.max_request_samples}

    async def stats(self) -> dict[str, Any]:
        """This replica's engine counters (requests, samples, batches, errors, ...)."""
        return {**self.engine.stats, "uptime_s": time.time() - self._started}


def build_app(cfg: TeacherConfig):
    """The Serve application for `cfg` (not yet running)."""
    return TeacherDeployment.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg.to_dict())


def deploy(cfg: TeacherConfig) -> DeploymentHandle:
    """Start (or update) the detached, named teacher app and return its handle once it runs."""
    return serve.run(build_app(cfg), name=cfg.app_name, route_prefix=None, blocking=False)


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
                f"Deploy it with teacher_service.deployment.deploy(cfg) or `serve deploy`."
            )
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def app_builder(args: dict):
    """Serve config entry point (import_path teacher_service.deployment:app_builder); args = TeacherConfig fields."""
    return build_app(TeacherConfig.from_dict(dict(args or {})))
