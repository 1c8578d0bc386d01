"""Multi-process set-up and the few host-side collectives the loop needs.

One process per host (per GPU node, per TPU VM). On Cloud TPU, `jax.distributed.initialize()` finds its peers by
itself; elsewhere the three flags named like its arguments say where the coordinator is.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from ift_jax.errors import UserError


def _on_cloud_tpu_pod() -> bool:
  # Set by the Cloud TPU runtime on every worker of a multi-host slice.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def initialize(*, coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: int, heartbeat_timeout_s: int = 100) -> None:
  """Joins the job's processes, or does nothing for a single-process run. Fails within `timeout_s`, never hangs.

  A process that stops answering for `heartbeat_timeout_s` (JAX's default: 100) is taken as dead, and the
  coordination service then ends every other process of the job (see `exit_now`).
  """
  explicit = [coordinator_address, num_processes, process_id]
  if all(v is None for v in explicit):
    if _on_cloud_tpu_pod():
      _call(timeout_s=timeout_s, what="Cloud TPU auto-detection", heartbeat_timeout_seconds=heartbeat_timeout_s)
    return
  if any(v is None for v in explicit):
    raise UserError("--coordinator_address, --num_processes and --process_id go together: give all three "
                    "(or none, for one process or Cloud TPU auto-detection)")
  if not 0 <= process_id < num_processes:
    raise UserError(f"--process_id={process_id} must be in [0, {num_processes}) (--num_processes)")
  if process_id != 0:  # the runtime aborts the process on a timeout; probe first to fail with a clear message
    _wait_for_coordinator(coordinator_address, timeout_s)
  # CPU processes exchange data over TCP with gloo; the setting only affects the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  _call(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        timeout_s=timeout_s, what=f"coordinator {coordinator_address}", heartbeat_timeout_seconds=heartbeat_timeout_s)


def this_process() -> str:
  """"process I of N", for messages."""
  return f"process {jax.process_index()} of {jax.process_count()}"


def exit_now(code: int) -> None:
  """Ends this process at once, skipping the interpreter's shutdown, when one process of a job fails alone.

  A normal exit waits at JAX's shutdown barrier for the other processes, which meanwhile wait for this one in
  their next collective: the job stalls for the shutdown timeout (5 minutes) and then aborts amid barrier
  errors. Gone at once, the process is reported dead by the coordination service, which ends the others: at
  once when it was process 0 (it hosts the service), after the heartbeat timeout otherwise (measured on CPU,
  2 processes: 1 s and 101 s). Checkpoints stay whole: Orbax renames a checkpoint only when it is complete.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--coordinator_address={address!r}: use host:port")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise UserError(f"could not join the job via coordinator {address} within {timeout_s} s ({e}); check "
                        "that process 0 is running and the address and port are reachable from this host") from None
      time.sleep(0.5)


def _call(*, timeout_s: int, what: str, **kwargs) -> None:
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except Exception as e:  # the runtime raises several types; all mean the same to the user
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"could not join the job via {what} within {timeout_s} s ({first[:200]}); check that "
                    "process 0 is running, the address and port are reachable from every host, and "
                    "--num_processes matches the processes started") from None


def global_max(value: int) -> int:
  """The largest `value` over all processes (the same answer on each)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def global_sum(values: np.ndarray) -> np.ndarray:
  """Element-wise sum of a same-shaped array over all processes."""
  if jax.process_count() == 1:
    return np.asarray(values)
  return np.asarray(multihost_utils.process_allgather(np.asarray(values))).sum(axis=0)
