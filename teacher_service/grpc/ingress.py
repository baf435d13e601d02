"""The teacher's gRPC ingress: our own grpc.aio server in a detached Ray actor, one per teacher app.

Why not Serve's gRPC proxy: in ray 2.60 it binds `[::]:<port>` with no host option and its
options are fixed when Serve starts. This server binds `TeacherConfig.grpc.host` (127.0.0.1
unless configured otherwise) and `grpc.port` (`config.GrpcOptions`), and per Embed rpc:
1. checks the bearer token (`auth.TokenCheck`) when the app has `grpc.token_file`, which grants
   the caller a weight cap and, for a token the file maps to a name, its name;
2. names the caller (that name, else `caller_limits.caller_name`: `kd-caller` metadata, else the
   peer's host);
3. decodes the proto with the byte limit (`codec.decode_embed_request`; never pickle);
4. admits it under the caller's in-flight and samples/s limits (`caller_limits.CallerAdmission`);
5. forwards it through a DeploymentHandle with `run = "grpc:<caller>"` and the weight the server
   grants (`caller_limits.grant_weight`: 1 without a token, at most the token's cap with one): the
   path in-cluster students take, so coalescing, view-affine routing and the replicas' weighted
   fair share apply, with each caller its own run and no caller choosing its own share.
Refusals are answered at once with a status code, the reason as details and the counter kind as
`kd-refusal` trailing metadata, and counted here (the replicas count what reaches them; the
teacher's stats add both, `stats.add_ingress`).

With `grpc.tls_cert_file` / `grpc.tls_key_file` the port speaks TLS only (`server_credentials`),
and with `grpc.tls_client_ca_file` it also requires a client certificate that CA signed. The same
port serves the standard grpc.health.v1.Health (`AppHealth`: services "", the app's name and
TeacherService's full name), unauthenticated since it tells only SERVING / NOT_SERVING:
SERVING while Serve lists the app and a replica answered within the last poll (an Embed, or an
`info` probe); `grpc.health_port` serves that Health alone in plaintext, for probes that cannot
speak TLS (Kubernetes' `grpc:` probe).

The actor is named "<app>-grpc" in namespace "kd-teacher", detached (it outlives the command that
started it, like the app), pinned to the node that started it (so 127.0.0.1 means that machine),
and stops itself when its app is deleted. `teacher_service.app.deploy` starts it when `grpc.port` is set
and `teacher_service.app.delete_teacher` stops it with the app.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, NoReturn, Protocol

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from teacher_service.grpc.auth import TokenCheck, UnauthenticatedError
from teacher_service.grpc.caller_limits import CallerAdmission, CallerGrant, CallerLimitError, grant_weight, peer_host
from teacher_service.grpc.caller_limits import caller_name as name_caller
from teacher_service.config import GrpcOptions, TeacherConfig
from teacher_service.grpc.codec import (
    MAX_DETAILS_CHARS,
    REFUSAL_METADATA,
    WireLimits,
    decode_embed_request,
    encode_embed_reply,
    encode_health_reply,
    encode_stats_reply,
    grpc_status_for,
    refusal_kind,
)
from teacher_service.grpc.proto import teacher_pb2 as pb
from teacher_service.grpc.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse, RequestError
from teacher_service.stats import (MetricsSink, TeacherCounters, add_ingress, merge_stats, ray_metrics_sink,
                                   rss_bytes)

log = logging.getLogger(__name__)

INGRESS_NAMESPACE = "kd-teacher"
GRPC_RUN_PREFIX = "grpc:"
INGRESS_REPLICA = "grpc-ingress"  # the ingress's counters and metrics, under the replica tag
WATCH_INTERVAL_S = 2.0
APP_GONE_POLLS = 2  # consecutive polls without the app before the ingress stops itself
PROBE_TIMEOUT_S = 10.0  # an idle app whose replicas do not answer `info` within this is NOT_SERVING
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
MAX_GRPC_MESSAGE = 2**31 - 1


class GrpcBindError(RuntimeError):
    """The ingress could not listen on the configured address (in use, or not an address of this node)."""


class AppMismatchError(LookupError):
    """The caller asked (metadata "application") for another app than this ingress serves."""


def ingress_name(app_name: str) -> str:
    return f"{app_name}-grpc"


def bind_address(host: str, port: int) -> str:
    """"host:port", with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ============================================================================================ servicer
class TeacherBackend(Protocol):
    """What the servicer forwards to: the teacher app (ServeBackend) or a fake in unit tests."""

    async def embed(self, request: EmbedRequest) -> EmbedResponse: ...
    async def info(self) -> dict[str, Any]: ...
    async def stats(self, all_replicas: bool) -> dict[str, Any]: ...


class ServeBackend:
    """The teacher app through a DeploymentHandle, as students reach it (created in the actor that uses it)."""

    def __init__(self, app_name: str):
        from ray import serve

        self.handle = serve.get_app_handle(app_name)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        return await self.handle.embed.remote(request)

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()

    async def stats(self, all_replicas: bool) -> dict[str, Any]:
        if not all_replicas:
            return await self.handle.stats.remote()
        return merge_stats(await self.handle.broadcast("stats", include_samples=True).results_async(timeout_s=30))


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    """rpcs Embed, Stats, Health: token, caller, size and rate checks, then the backend."""

    def __init__(self, cfg: TeacherConfig, backend: TeacherBackend, clock=time.monotonic,
                 sink: MetricsSink | None = None):
        """`sink`: where refusals are mirrored (Ray metrics in the ingress actor: `kd_teacher_errors`
        by app, run and kind, beside the replicas' own)."""
        self.cfg = cfg
        self.backend = backend
        self.auth = TokenCheck.from_file(cfg.grpc.token_file, cfg.serving.max_run_weight)
        self.wire_limits = WireLimits(max_request_bytes=cfg.grpc.max_request_bytes)
        self.admission = CallerAdmission(cfg.grpc.caller_limits(), clock)
        self.counters = TeacherCounters(1, cfg.serving.app_name, INGRESS_REPLICA, clock=clock, sink=sink)
        self.address = ""
        self.last_answer: float | None = None  # clock time a replica last answered through this ingress
        self._clock = clock
        self._started = time.time()

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedReply:
        run = GRPC_RUN_PREFIX + peer_host(context.peer())  # who to count a refusal under until named
        admitted = None
        try:
            caller, grant = self._caller(context)
            run = GRPC_RUN_PREFIX + caller
            decoded = decode_embed_request(request, self.wire_limits)
            admitted = self.admission.admit(caller, len(decoded))
        except (UnauthenticatedError, AppMismatchError, RequestError, CallerLimitError) as e:
            await self._refuse(context, run, e)
        try:
            granted = dataclasses.replace(decoded, run=run, weight=grant_weight(decoded.weight, grant))
            response = await self.backend.embed(granted)
            self.last_answer = self._clock()
        except Exception as e:  # noqa: BLE001 - answered with a status; the replica counted its own refusals
            await _abort_backend_failure(context, e)
        finally:
            self.admission.release(admitted)
        return encode_embed_reply(response)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsReply:
        """The replica's (or all replicas' merged) counters plus this ingress's refusals."""
        await self._check_only(context)
        try:
            stats = await self.backend.stats(bool(request.all_replicas))
        except Exception as e:  # noqa: BLE001
            await _abort_backend_failure(context, e)
        return encode_stats_reply(add_ingress(stats, self.snapshot()))

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        """Identity of a replica that answers, and the limits this ingress applies."""
        await self._check_only(context)
        try:
            info = await self.backend.info()
        except Exception as e:  # noqa: BLE001
            await _abort_backend_failure(context, e)
        return encode_health_reply({**info, "max_request_bytes": self.wire_limits.max_request_bytes})

    def snapshot(self) -> dict[str, Any]:
        """The ingress's refusal counters and state (`stats.add_ingress` adds them to the replicas')."""
        return {**self.counters.snapshot(), "address": self.address, "callers_in_flight": self.admission.in_flight(),
                "rss_bytes": rss_bytes(), "uptime_s": time.time() - self._started}

    # ---- internals
    def _caller(self, context: grpc.aio.ServicerContext) -> tuple[str, CallerGrant | None]:
        """(caller name, grant): token first (an unauthenticated caller's metadata is not trusted),
        then the app, then the name: the token's own, else the declared one. Grant None: no token
        is configured, so nobody is authenticated."""
        metadata = tuple(context.invocation_metadata() or ())
        grant = self.auth.check(metadata) if self.auth is not None else None
        asked = next((value for key, value in metadata if key == "application"), None)
        if asked not in (None, self.cfg.serving.app_name):
            raise AppMismatchError(f"application: this gRPC port serves teacher app {self.cfg.serving.app_name!r}, "
                                   f"not {asked!r}")
        if grant is not None and grant.name is not None:
            return grant.name, grant
        return name_caller(metadata, context.peer()), grant

    async def _check_only(self, context: grpc.aio.ServicerContext) -> None:
        run = GRPC_RUN_PREFIX + peer_host(context.peer())
        try:
            self._caller(context)
        except (UnauthenticatedError, AppMismatchError, RequestError) as e:
            await self._refuse(context, run, e)

    async def _refuse(self, context: grpc.aio.ServicerContext, run: str, error: Exception) -> NoReturn:
        """Count the refusal under `run` and answer it (context.abort raises)."""
        if isinstance(error, AppMismatchError):
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error)[:MAX_DETAILS_CHARS])
        kind = refusal_kind(error)
        self.counters.refused(self.counters.received(run), kind)
        await context.abort(grpc_status_for(error), str(error)[:MAX_DETAILS_CHARS], ((REFUSAL_METADATA, kind),))


async def _abort_backend_failure(context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
    """A failure behind the ingress as a status: refusals keep their code, an absent app is UNAVAILABLE."""
    from ray.serve.exceptions import BackPressureError, RayServeException

    cause = getattr(error, "cause", None) or error  # Ray wraps what the replica raised
    if isinstance(cause, RequestError):
        code = grpc_status_for(cause)
    elif isinstance(cause, BackPressureError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(cause, (RayServeException, ray.exceptions.RayActorError)):
        code = grpc.StatusCode.UNAVAILABLE
    else:
        code = grpc.StatusCode.INTERNAL
    details = str(cause) if isinstance(cause, RequestError) else f"{type(cause).__name__}: {cause}"
    await context.abort(code, details[:MAX_DETAILS_CHARS])


# ============================================================================================== health
class AppHealth:
    """grpc.health.v1 for one app: one status for "", the app's name and TeacherService, NOT_SERVING
    until the first check passes. A readiness probe asks "can this port answer Embed now?", so
    the status follows the app (listed by Serve, a replica answering), not just this process."""

    def __init__(self, app_name: str):
        self.servicer = health_aio.HealthServicer()
        self.services = ("", app_name, SERVICE_NAME)
        self.serving: bool | None = None

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self.services:
            await self.servicer.set(service, status)
        if serving != self.serving:
            log.info("gRPC health of %r: %s", self.services[1], "SERVING" if serving else "NOT_SERVING")
        self.serving = serving

    async def update(self, listed: bool, servicer: TeacherServicer, clock=time.monotonic) -> bool:
        """Set the status from one poll: the app listed, and a replica answered since the last poll
        (an Embed through this ingress) or answers an `info` probe now. Returns it."""
        recent = servicer.last_answer is not None and clock() - servicer.last_answer < WATCH_INTERVAL_S
        serving = listed and (recent or await _answers(servicer.backend))
        await self.set(serving)
        return serving

    async def shutdown(self) -> None:
        """NOT_SERVING for good (callers see it during the stop's grace period)."""
        await self.servicer.enter_graceful_shutdown()
        self.serving = False


async def _answers(backend: TeacherBackend) -> bool:
    try:
        await asyncio.wait_for(backend.info(), PROBE_TIMEOUT_S)
        return True
    except Exception as e:  # noqa: BLE001 - any failure means the app does not answer
        log.debug("gRPC health: the teacher app did not answer info(): %s: %s", type(e).__name__, e)
        return False


# ============================================================================================== server
def server_credentials(options: GrpcOptions) -> grpc.ServerCredentials | None:
    """TLS credentials from the options' PEM files (None: plaintext). With a client CA every caller
    must present a certificate it signed; the handshake fails otherwise, before any rpc."""
    if not options.tls_enabled():
        return None
    with open(options.tls_key_file, "rb") as f:
        key = f.read()
    with open(options.tls_cert_file, "rb") as f:
        chain = f.read()
    client_ca = None
    if options.tls_client_ca_file:
        with open(options.tls_client_ca_file, "rb") as f:
            client_ca = f.read()
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


async def serve_grpc(servicer: TeacherServicer, host: str, port: int,
                     health: AppHealth | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for `servicer` (and `health`) on host:port; returns it and the bound port.

    TLS when the servicer's config has a certificate and key (`server_credentials`). SO_REUSEPORT
    is off, so a port another server holds is an error rather than silently shared. gRPC's own
    receive limit is twice the request limit: up to there a large request reaches the decoder and
    is refused with our message (counted `errors_too_large`); beyond it gRPC refuses it before
    reading it (RESOURCE_EXHAUSTED, not counted).
    """
    limit = min(MAX_GRPC_MESSAGE, 2 * servicer.wire_limits.max_request_bytes)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", -1)])
    pb_grpc.add_TeacherServiceServicer_to_server(servicer, server)
    if health is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    bound = _listen(server, host, port, server_credentials(servicer.cfg.grpc))
    await server.start()
    return server, bound


async def serve_health(health: AppHealth, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with grpc.health.v1.Health alone (no TeacherService, so nothing to protect
    but the app's status): for probes that cannot speak TLS, such as Kubernetes' `grpc:` probe."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    bound = _listen(server, host, port, None)
    await server.start()
    return server, bound


def _listen(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    address = bind_address(host, port)
    try:
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    except RuntimeError as e:
        raise GrpcBindError(f"gRPC ingress: cannot listen on {address}: {e}") from e
    if not bound:
        raise GrpcBindError(f"gRPC ingress: cannot listen on {address} (in use, or not an address of this node)")
    return bound


# =============================================================================================== actor
@ray.remote(num_cpus=0, max_restarts=0)
class GrpcIngress:
    """The servicer and its grpc.aio server on this actor's event loop; stops itself with its app."""

    def __init__(self, config: dict):
        self.cfg = TeacherConfig.from_dict(config)
        self.app_name = self.cfg.serving.app_name
        self.servicer = TeacherServicer(self.cfg, ServeBackend(self.app_name),
                                        sink=ray_metrics_sink(self.app_name, INGRESS_REPLICA, "ingress"))
        self.health = AppHealth(self.app_name)
        self.servers: list[grpc.aio.Server] = []
        self.health_address = ""
        self._watch: asyncio.Task | None = None

    async def start(self) -> str:
        """Listen (and on the health port when configured); returns the bound "host:port"."""
        options = self.cfg.grpc
        await self.health.set(False)  # until the first poll finds the app answering
        server, port = await serve_grpc(self.servicer, options.host, int(options.port or 0), self.health)
        self.servers.append(server)
        self.servicer.address = bind_address(options.host, port)
        if options.health_port is not None:
            server, port = await serve_health(self.health, options.host, options.health_port)
            self.servers.append(server)
            self.health_address = bind_address(options.host, port)
        self._watch = asyncio.get_running_loop().create_task(self._follow_app())
        return self.servicer.address

    async def address(self) -> str:
        return self.servicer.address

    async def addresses(self) -> dict[str, str]:
        """{"grpc": host:port, "health": host:port or ""}."""
        return {"grpc": self.servicer.address, "health": self.health_address}

    async def stats(self) -> dict[str, Any]:
        return {**self.servicer.snapshot(), "health_serving": self.health.serving}

    async def stop(self, grace_s: float = 1.0) -> None:
        """NOT_SERVING, then stop listening (the ports are free when this returns); the actor itself is
        killed by the caller."""
        await self.health.shutdown()
        await asyncio.gather(*(server.stop(grace_s) for server in self.servers))

    async def _follow_app(self) -> None:
        """Every WATCH_INTERVAL_S: the health status follows the app; after APP_GONE_POLLS polls
        without the app in Serve's status, stop listening and end this actor."""
        missing = 0
        while missing < APP_GONE_POLLS:
            listed = await self._app_listed()
            if listed is not None:
                missing = 0 if listed else missing + 1
                await self.health.update(listed, self.servicer)
            await asyncio.sleep(WATCH_INTERVAL_S)
        log.warning("gRPC ingress: teacher app %r is gone; stopping", self.app_name)
        await self.stop()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def _app_listed(self) -> bool | None:
        """Whether Serve lists the app (and is not deleting it); None when Serve's status is unreadable."""
        from ray import serve

        try:
            apps = (await asyncio.to_thread(serve.status)).applications
        except Exception as e:  # noqa: BLE001 - a busy or restarting controller is no reason to stop
            log.warning("gRPC ingress: cannot read Serve status: %s", e)
            return None
        app = apps.get(self.app_name)
        return app is not None and not str(app.status).endswith("DELETING")


# ============================================================================================ lifecycle
def find_ingress(app_name: str):
    """The app's running ingress actor, or None."""
    try:
        return ray.get_actor(ingress_name(app_name), namespace=INGRESS_NAMESPACE)
    except ValueError:
        return None


def start_ingress(cfg: TeacherConfig, timeout_s: float = 60.0) -> str:
    """(Re)start the gRPC ingress of `cfg.serving.app_name` on this node; returns the address it listens on.

    The app must be deployed (the ingress takes its handle at start). An ingress already running
    for the app is stopped first, so a redeploy applies new gRPC settings.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    app_name = cfg.serving.app_name
    if cfg.grpc.port is None:
        raise ValueError(f"teacher app {app_name!r}: grpc.port is None, so there is no gRPC ingress to start")
    stop_ingress(app_name, timeout_s)
    warn_if_exposed(cfg)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = GrpcIngress.options(name=ingress_name(app_name), namespace=INGRESS_NAMESPACE, lifetime="detached",
                                scheduling_strategy=here).remote(cfg.to_dict())
    try:
        return ray.get(actor.start.remote(), timeout=timeout_s)
    except ray.exceptions.RayTaskError as e:
        ray.kill(actor, no_restart=True)
        raise (e.cause if isinstance(e.cause, Exception) else e) from None
    except BaseException:
        ray.kill(actor, no_restart=True)
        raise


def warn_if_exposed(cfg: TeacherConfig) -> str | None:
    """Log (and return) a warning when the ingress is reachable off this machine without TLS or a
    token: only possible with `grpc.insecure`, which config validation requires for it."""
    gaps = cfg.grpc.exposure_gaps()
    if not gaps:
        return None
    message = (f"gRPC ingress of {cfg.serving.app_name!r} listens on {cfg.grpc.host} without "
               f"{' and without '.join(gaps)} (grpc.insecure): anyone who reaches that address can use the teacher "
               "and read what it sends")
    log.warning(message)
    return message


def stop_ingress(app_name: str, timeout_s: float = 30.0) -> bool:
    """Stop the app's ingress (port released, name free) if one runs; True when there was one."""
    actor = find_ingress(app_name)
    if actor is None:
        return False
    try:
        ray.get(actor.stop.remote(), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - killed below either way
        log.warning("gRPC ingress of %r did not stop cleanly: %s", app_name, e)
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while find_ingress(app_name) is not None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gRPC ingress {ingress_name(app_name)!r} still registered {timeout_s:.0f}s after kill")
        time.sleep(0.1)
    return True


def ingress_address(app_name: str, timeout_s: float = 30.0) -> str | None:
    """Where the app's ingress listens ("host:port"), or None when it has none."""
    actor = find_ingress(app_name)
    return None if actor is None else ray.get(actor.address.remote(), timeout=timeout_s)


def ingress_addresses(app_name: str, timeout_s: float = 30.0) -> dict[str, str] | None:
    """{"grpc": host:port, "health": host:port or ""} of the app's ingress, or None when it has none."""
    actor = find_ingress(app_name)
    return None if actor is None else ray.get(actor.addresses.remote(), timeout=timeout_s)


def ingress_stats(app_name: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """The ingress's refusal counters and state, or None when the app has no ingress."""
    actor = find_ingress(app_name)
    return None if actor is None else ray.get(actor.stats.remote(), timeout=timeout_s)
