"""Multi-host start-up and process-0 helpers.

`maybe_initialize` calls `jax.distributed.initialize` only when the run really spans several
processes: explicit `num_processes > 1` (GPU clusters, SLURM, local multi-process tests), or a
Cloud TPU pod / SLURM allocation that JAX can auto-detect (then no arguments are needed). A
single-host run never touches the distributed runtime. It must run before anything else touches
the devices (jax.devices(), building a mesh, creating arrays).
"""
from __future__ import annotations

import os

import jax
from absl import logging

_initialized = False


def _tpu_pod_env() -> bool:
    """True on a multi-host Cloud TPU slice (the TPU runtime's per-worker host list)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_HOSTNAMES")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    return bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))   # multi-slice


def _slurm_multi_task_env() -> bool:
    ntasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
    return bool(os.environ.get("SLURM_JOB_ID")) and ntasks is not None and int(ntasks) > 1


def _jax_detected_process_count() -> int | None:
    """Process count from JAX's own cluster detection (Cloud TPU metadata, SLURM, ...).

    Uses JAX's private `clusters` module (what `jax.distributed.initialize()` itself uses);
    any failure there just means "not detected".
    """
    try:
        from jax._src import clusters
        for env in clusters.ClusterEnv._cluster_types:
            if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
                return int(env.get_process_count())
    except Exception as e:  # noqa: BLE001  (private API; detection is best effort)
        logging.debug("JAX cluster detection failed: %s", e)
    return None


def is_multihost_env() -> bool:
    """The environment says the run spans several processes (no flags needed).

    `WAMGLM_DISTRIBUTED=auto` forces `jax.distributed.initialize()` with auto-detection
    (launch/tpu_pod.sh sets it); `WAMGLM_DISTRIBUTED=off` disables detection.
    """
    mode = os.environ.get("WAMGLM_DISTRIBUTED", "").lower()
    if mode in ("off", "0", "false", "no"):
        return False
    if mode in ("auto", "1", "true", "yes"):
        return True
    if _tpu_pod_env() or _slurm_multi_task_env():
        return True
    n = _jax_detected_process_count()
    return n is not None and n > 1


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialise jax.distributed when multi-host; returns True if it did (or already had).

    Explicit arguments (all three, or num_processes <= 1 for single-host) take precedence;
    otherwise JAX's cluster auto-detection (Cloud TPU, SLURM) is used when the environment
    says the run spans several hosts.
    """
    global _initialized
    if _initialized:
        return True
    explicit = num_processes is not None and num_processes > 1
    if explicit:
        if not coordinator_address or process_id is None:
            raise ValueError(
                f"--num_processes={num_processes} needs --coordinator_address=HOST:PORT and "
                f"--process_id in [0, {num_processes}) (got coordinator_address="
                f"{coordinator_address!r}, process_id={process_id!r})")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is outside [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif (num_processes is None or num_processes <= 0) and is_multihost_env():
        jax.distributed.initialize()    # auto-detect: TPU pod metadata / SLURM variables
    else:
        return False
    _initialized = True
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def log_main(msg: str, *args) -> None:
    """absl INFO log on process 0 only."""
    if is_main_process():
        logging.info(msg, *args)


def sync(name: str) -> None:
    """Barrier across processes (no-op single-process); `name` must match on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
