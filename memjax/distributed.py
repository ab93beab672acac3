"""Joining a multi-process run: `jax.distributed.initialize` from config or the environment.

Every process runs the same command. On a Cloud TPU pod slice, a Slurm or an Open MPI job, JAX
finds the coordinator, the process count and this process's id by itself; elsewhere (several GPU
hosts, or several processes on one machine) give them in `distributed.*` or in JAX's variables
JAX_COORDINATOR_ADDRESS (and the config's num_processes / process_id).
"""

from __future__ import annotations

import os

import jax

from memjax.config import ConfigError, DistributedConfig

# Variables that mark a job of several processes, by launcher.
_LAUNCHERS = {
    "Slurm": ("SLURM_NTASKS",),
    "Open MPI": ("OMPI_COMM_WORLD_SIZE",),
}


def detected_launcher() -> str | None:
  """The multi-process launcher this process runs under, if any."""
  workers = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(workers) > 1:
    return "Cloud TPU pod"
  for name, variables in _LAUNCHERS.items():
    if any(int(os.environ.get(v, "1") or "1") > 1 for v in variables):
      return name
  return None


def initialize(cfg: DistributedConfig) -> str | None:
  """Joins the run when `cfg` asks for it; returns a line saying how, or None for one process.

  Must run before anything touches a JAX backend. Calling it again is a no-op.
  """
  if jax.distributed.is_initialized():
    return None
  coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  launcher = detected_launcher()
  if cfg.initialize == "off" or (cfg.initialize == "auto" and not coordinator and launcher is None):
    return None
  if coordinator and (cfg.num_processes == 0 or cfg.process_id == -1) and launcher is None:
    raise ConfigError(
        "distributed",
        f"with the coordinator {coordinator} and no cluster launcher to ask, set "
        "distributed.num_processes and distributed.process_id as well",
    )
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator or None,
        num_processes=cfg.num_processes or None,
        process_id=None if cfg.process_id == -1 else cfg.process_id,
        initialization_timeout=cfg.timeout,
    )
  except (RuntimeError, ValueError) as error:
    raise ConfigError(
        "distributed", f"could not join the run ({error}); check distributed.* and that every "
        "process was started",
    ) from error
  return (
      f"process {jax.process_index()} of {jax.process_count()} ({launcher or 'coordinator ' + coordinator}); "
      f"{jax.local_device_count()} local of {jax.device_count()} devices"
  )
