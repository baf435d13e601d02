"""Connecting to Ray: an existing cluster (address / RAY_ADDRESS, with its token: cluster.auth) or an
embedded local one."""
from __future__ import annotations

import logging
import os
import re
from typing import Callable, Optional

from cluster.auth import cluster_auth

log = logging.getLogger(__name__)


def default_local_cpus() -> int:
    """Logical CPUs for an embedded cluster.

    A teacher replica and each student worker reserve a CPU; on a 2-core laptop that would leave
    nothing for Ray Data or the driver, so the embedded cluster oversubscribes (workers run with
    one torch thread each, so the cores are shared, not fought over).
    """
    return max(4, 2 * (os.cpu_count() or 1))


DRIVER_LOGGERS = ("ray", "ray.serve", "ray.train", "ray.data")


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None,
             object_store_mb: Optional[int] = None, quiet: bool = False, verbose: bool = True) -> str:
    """Connect to `address` (or $RAY_ADDRESS), else start an embedded local cluster.

    `quiet`: no output of Ray's workers reaches this process at all. Not `verbose`: workers' output
    does (their warnings and errors), but this process's own Ray loggers show warnings and errors
    only (`quiet_driver_console`). Returns a short description for the user. Safe to call twice.
    """
    description = _connect(address, num_cpus, object_store_mb, log_to_driver=not quiet,
                           logging_level=logging.INFO if verbose else logging.WARNING)
    if not verbose:
        quiet_driver_console()
    return description


def _connect(address: Optional[str], num_cpus: Optional[int], object_store_mb: Optional[int],
             log_to_driver: bool, logging_level: int) -> str:
    import ray

    if ray.is_initialized():
        return "already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray job's driver: the job's runtime env applies
            runtime_env = None  # (Ray refuses a second one that sets the same fields)
        with cluster_auth(address):  # the cluster's token where Ray looks for it; a missing one: one line
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver,
                     logging_level=logging_level)
        return f"connected to Ray cluster at {address}"
    cpus = num_cpus or default_local_cpus()
    runtime_env["worker_process_setup_hook"] = "student_trainer.progress.quiet_placement_group_cleaner"
    ray.init(
        address="local",  # a new cluster even when another runs here (else Ray joins that one and refuses num_cpus)
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=(object_store_mb or 1024) * 2**20,
        runtime_env=runtime_env,
        log_to_driver=log_to_driver,
        logging_level=logging_level,
    )
    return f"started an embedded local Ray cluster ({cpus} logical CPUs on {os.cpu_count()} cores)"


def quiet_driver_console() -> None:
    """This process's Ray loggers (Serve's "application ready", Ray Data's execution plans) show
    warnings and errors only on the console; their log files keep everything. Ray Data configures
    its logger when imported, so a command that uses it imports it first. The root logger gets the
    console handler its first warning would give it (`logging.basicConfig`), with the same filter."""
    from student_trainer.progress import quiet_console

    if not logging.getLogger().handlers:
        logging.basicConfig()
    quiet_console("", *DRIVER_LOGGERS)
    quiet_forwarded_serve_logs()


SERVE_ACTORS = ("ServeController", "ProxyActor", "ServeReplica:")
_INFO_LINE = re.compile(r"^\s*(INFO|DEBUG)\b")  # Serve's format: "INFO 2026-12-04 14:34:38,558 proxy ... -- ..."
# Lines of Ray's own that every quiet run printed and no user can act on: Ray Train's controller
# starts its PreemptionWatcher with restarts, and Ray's core worker says so at error level.
KNOWN_NOISE = re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .* max_restarts > 0")
_PRINTER = "ray_print_logs"  # the name ray.init gives its printer of worker output, and ray.shutdown removes


def quiet_forwarded_serve_logs() -> bool:
    """Drop the INFO lines Ray forwards to this driver from Serve's actors (controller, proxies,
    replicas: deploy steps, the access log). Serve's actors belong to no job, so Ray forwards
    their output to every driver on the cluster: each quiet student run on a shared teacher pool
    would print the pool's access log. Their log files keep every line; warnings and errors still
    reach the console. Wraps the printer in Ray's (private) worker-output dispatcher of the pinned
    Ray under the printer's own name, so ray.shutdown removes it as it would Ray's; returns False,
    filtering nothing, where that is absent (no worker output reaches this driver)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    printers = [h for name, h in list(getattr(dispatcher, "handlers", [])) if name == _PRINTER]
    if len(printers) != 1:
        return False
    if getattr(printers[0], "drops_serve_info", False):
        return True
    dispatcher.remove_handler(_PRINTER)
    dispatcher.add_handler(_PRINTER, without_serve_info(printers[0]))
    return True


def without_serve_info(printer: Callable[[dict], None]) -> Callable[[dict], None]:
    """`printer` of Ray's forwarded worker-output batches, without Serve actors' INFO/DEBUG lines
    and without `KNOWN_NOISE` from any actor."""
    def print_batch(data: dict) -> None:
        serve_actor = str(data.get("actor_name") or "").startswith(SERVE_ACTORS)
        lines = [line for line in data.get("lines", [])
                 if not KNOWN_NOISE.search(line) and not (serve_actor and _INFO_LINE.match(line))]
        if not lines:
            return
        printer({**data, "lines": lines})
    print_batch.drops_serve_info = True
    return print_batch
