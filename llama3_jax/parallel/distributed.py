"""Multi-process start-up: `jax.distributed.initialize` before anything touches devices.

Sources, first match wins: explicit coordinator/process flags (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID variables), then SLURM or a TPU pod, which JAX detects
itself when initialize() is called without arguments.
"""

from __future__ import annotations

import os


def fake_cpu_devices(count: int | None) -> None:
    """Ask XLA for `count` host devices (for meshes on a laptop); must run before JAX starts."""
    if not count or count <= 1:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    import jax
    if jax.distributed.is_initialized():  # the next context stage of the same run
        return
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator:
        # Collectives between CPU devices of different processes go through gloo (this
        # only concerns the CPU backend; GPUs and TPUs use their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
