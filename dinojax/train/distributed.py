"""Multi-controller start-up: `jax.distributed.initialize()` when this is one process of many.

Explicit coordinates (command-line flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID) win; otherwise JAX's own cluster detection is used where a cluster is visible
(TPU pod slices, SLURM with several tasks, Open MPI). A plain single process starts nothing.
Must run before any JAX computation
(https://docs.jax.dev/en/latest/_autosummary/jax.distributed.initialize.html).
"""

from __future__ import annotations

import logging
import os

import jax

__all__ = ["maybe_initialize"]

log = logging.getLogger("dinojax.train")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def _cluster_visible() -> bool:
    if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return True
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Initialise the distributed runtime if this run has several processes. Returns whether it
    did. CPU processes use gloo collectives (the only cross-process CPU implementation)."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address is not None
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("a coordinator address needs num_processes and process_id as well")
    if not explicit and not _cluster_visible():
        return False
    if explicit and num_processes == 1:
        return False
    platforms = str(jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", ""))
    if "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    else:
        jax.distributed.initialize()
    log.info("process %d of %d", jax.process_index(), jax.process_count())
    return True
