"""Connecting to Ray: an existing cluster (address / RAY_ADDRESS) or an embedded local one."""
from __future__ import annotations

import logging
import os
from typing import Optional

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
