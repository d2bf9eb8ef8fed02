"""Several processes, one run: JAX's multi-controller runtime as jlora uses it.

Every process runs the same program on its own devices (a TPU pod's workers, a GPU
cluster's nodes, or local processes on CPU); ``jax.jit`` programs span all of them. This
module holds what that needs beyond shardings (``jlora.core.sharding``):

- ``join``: enter the runtime before anything touches a device, from the JLORA_COORDINATOR
  / JLORA_NUM_PROCESSES / JLORA_PROCESS_ID variables or JAX's own cluster detection (TPU
  pods, SLURM); ``cpu_devices``: N fake CPU devices (JLORA_CPU_DEVICES) to try sharding on
  a laptop or a Colab CPU runtime;
- ``primary``: process 0 writes the run directory's own files (every process takes part in
  orbax's saves and restores, which write the array shards);
- ``any_process``, ``to_host``, ``gather_json``: agreeing on a stop, arrays and small
  host values seen whole by every process;
- failing fast: a watchdog thread on every process ends it with one line when another
  process reports an error (``fail``) or stops showing signs of life (SIGKILL, a dead
  host), instead of a collective that waits forever. Each process bumps a counter in the
  runtime's key-value store every ``POLL_S``; a counter that has not moved for
  JLORA_STALE_S seconds (default 30) means its process is gone. If process 0 (which hosts
  the coordination service) dies, JAX itself ends the others at once, with its own log.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

ENV = {"coordinator": "JLORA_COORDINATOR", "num_processes": "JLORA_NUM_PROCESSES",
       "process_id": "JLORA_PROCESS_ID"}
CPU_DEVICES_ENV = "JLORA_CPU_DEVICES"
STALE_ENV = "JLORA_STALE_S"
MODES = ("env", "auto", "off")
POLL_S = 1.0
_PREFIX = "jlora"
_gathers = iter(range(1 << 62))  # one key-value tag per gather_json call, same on every process
_joined = False


def cpu_devices(n: int | None = None) -> None:
  """Make the CPU backend show ``n`` devices (default: JLORA_CPU_DEVICES; nothing if
  unset). Only before anything has touched a device."""
  n = n if n is not None else _env_int(CPU_DEVICES_ENV)
  if n is None:
    return
  if n < 1:
    raise ValueError(f"{CPU_DEVICES_ENV}={n}: must be >= 1")
  jax.config.update("jax_num_cpu_devices", n)


def join(mode: str = "env", timeout_s: int = 300) -> bool:
  """Enter JAX's multi-controller runtime before anything touches a device; True if this
  run spans several processes.

  ``mode``: "env" joins when JLORA_COORDINATOR, JLORA_NUM_PROCESSES and JLORA_PROCESS_ID
  are set (any one of them set and another missing is an error), else stays a single
  process; "auto" lets JAX detect the cluster (TPU pod, SLURM, ...); "off" never joins.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed {mode!r}: expected one of {', '.join(MODES)}")
  if mode == "off":
    return False
  if mode == "env":
    present = {k: os.environ.get(v) for k, v in ENV.items()}
    if not any(present.values()):
      return False
    missing = [ENV[k] for k, v in present.items() if not v]
    if missing:
      raise ValueError(f"{', '.join(missing)} not set: a multi-process run needs "
                       f"{', '.join(ENV.values())}")
  initialize(timeout_s=timeout_s)
  global _joined
  _joined = jax.process_count() > 1
  if _joined:
    _Watchdog.start()
  return _joined


def joined() -> bool:
  """Whether ``join`` made this a multi-process run."""
  return _joined


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> None:
  """Join JAX's multi-controller runtime (call first, before anything touches a device).

  With no arguments and none of JLORA_COORDINATOR / JLORA_NUM_PROCESSES / JLORA_PROCESS_ID
  set, ``jax.distributed.initialize()`` detects the cluster itself (TPU pods, SLURM, ...).
  On CPU, collectives between processes use gloo.

  Args:
    coordinator: "host:port" of process 0.
    num_processes: total number of processes.
    process_id: this process's index.
    timeout_s: how long to wait for all processes before giving up.
  """
  coordinator = coordinator or os.environ.get(ENV["coordinator"])
  num_processes = num_processes or _env_int(ENV["num_processes"])
  process_id = process_id if process_id is not None else _env_int(ENV["process_id"])
  if num_processes is not None and process_id is not None \
      and not 0 <= process_id < num_processes:
    raise ValueError(f"{ENV['process_id']}={process_id} is outside 0..{num_processes - 1}")
  # Only the CPU backend reads this: harmless where the devices are GPUs or TPUs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator and process_id:  # JAX aborts the process (no exception) if it never answers
    _wait_for(coordinator, timeout_s, process_id, num_processes)
  # JAX's own liveness check ends every process with a fatal log; ours (the watchdog)
  # must see a dead process first, so JAX's is set well beyond it.
  heartbeat = max(100, 3 * _stale_s())
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat)
  except Exception as e:  # jax raises XlaRuntimeError / RuntimeError variants here
    raise ValueError(f"could not join the distributed runtime at coordinator "
                     f"{coordinator!r} as process {process_id} of {num_processes} within "
                     f"{timeout_s} s: {str(e).splitlines()[0][:200]}") from None


def _wait_for(coordinator: str, timeout_s: float, process_id, num_processes) -> None:
  host, _, port = coordinator.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except OSError:
      if time.monotonic() > deadline:
        raise ValueError(f"could not join the distributed runtime at coordinator "
                         f"{coordinator!r} as process {process_id} of {num_processes}: "
                         f"nothing answered within {timeout_s} s") from None
      time.sleep(0.25)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _stale_s() -> int:
  return _env_int(STALE_ENV) or 30


# ----------------------------------------------------------------------------- roles

def processes() -> int:
  return jax.process_count()


def primary() -> bool:
  """Whether this process writes the run directory's own files (process 0)."""
  return jax.process_index() == 0


def name() -> str:
  return f"process {jax.process_index()} of {jax.process_count()}"


def local_rows(rows: int) -> slice:
  """This process's rows of a global batch of ``rows`` (``mesh.global_batch`` puts
  process p's block at rows [p rows/P, (p+1) rows/P))."""
  per = rows // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


# ----------------------------------------------------------------------------- agreeing

def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is true on any (a collective: call it on all
  processes at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def to_host(tree: Any) -> Any:
  """Every array of ``tree`` whole, as numpy, on every process (a collective when arrays
  span several processes)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def gather_json(value: Any, timeout_s: int = 600) -> list[Any]:
  """Every process's JSON-able ``value``, in process order (through the runtime's
  key-value store; call it on all processes at the same point)."""
  if jax.process_count() == 1:
    return [value]
  client = _client()
  tag = f"{_PREFIX}/gather/{next(_gathers)}"
  client.key_value_set(f"{tag}/{jax.process_index()}", json.dumps(value))
  return [json.loads(client.blocking_key_value_get(f"{tag}/{i}", timeout_s * 1000))
          for i in range(jax.process_count())]


def barrier(label: str, timeout_s: int = 600) -> None:
  """Wait until every process gets here."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(f"{_PREFIX}/{label}", timeout_s * 1000)


# ----------------------------------------------------------------------------- failing fast

def peer_lost(e: BaseException) -> bool:
  """Whether ``e`` is a collective failing because another process went away."""
  text = str(e)
  return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(
      s in text for s in ("Gloo", "Connection reset", "Connection closed", "NCCL"))


def await_watchdog() -> None:
  """Give the watchdog the time to notice a silent process (it ends this one, naming it)."""
  time.sleep(_stale_s() + 3 * POLL_S)


def _client():
  from jax._src import distributed  # the runtime's client: no public handle in jax 0.10
  return distributed.global_state.client


def fail(message: str) -> None:
  """Tell the other processes that this one is stopping on ``message`` (best effort);
  their watchdogs end them with one line naming this process. Process 0 hosts the
  coordination service, so it waits for the others to read it before returning."""
  if not _joined:
    return
  _Watchdog.quiet = True  # this process is stopping: it reports nothing more of others
  try:
    _client().key_value_set(f"{_PREFIX}/failed/{jax.process_index()}", message[:500])
  except Exception:  # the runtime is already gone: nothing to tell
    return
  if primary():
    time.sleep(3 * POLL_S)


class _Watchdog:
  """A daemon thread: this process's sign of life, and the others' (see the module
  docstring). It ends this process (``os._exit(1)``) with one line on stderr."""

  _thread: threading.Thread | None = None
  quiet = False

  @classmethod
  def start(cls) -> None:
    if cls._thread is None:
      # atexit runs handlers last-registered first: this one before jax's own shutdown,
      # whose cancelled calls must not read as a lost coordinator
      atexit.register(setattr, cls, "quiet", True)
      cls._thread = threading.Thread(target=cls._run, name="jlora-watchdog", daemon=True)
      cls._thread.start()

  @staticmethod
  def _run() -> None:
    client, me, count = _client(), jax.process_index(), jax.process_count()
    stale = _stale_s()
    seen = {i: (None, time.monotonic()) for i in range(count) if i != me}
    while True:
      try:
        client.key_value_increment(f"{_PREFIX}/alive/{me}", 1)
        for key, message in client.key_value_dir_get(f"{_PREFIX}/failed/"):
          who = int(key.rsplit("/", 1)[-1])
          if who != me:
            _stop(f"process {who} failed ({message}); stopping {name()}")
        now = time.monotonic()
        for i, (last, since) in seen.items():
          value = _try_get(client, f"{_PREFIX}/alive/{i}")
          if value != last:
            seen[i] = (value, now)
          elif now - since > stale:
            _stop(f"process {i} of {count} stopped responding (no sign of life for "
                  f"{stale} s); stopping {name()}")
      except Exception as e:  # the coordination service (process 0) is unreachable
        _stop(f"lost the coordinator (process 0): {str(e).splitlines()[0][:120]}; "
              f"stopping {name()}")
      time.sleep(POLL_S)


def _try_get(client, key: str) -> str | None:
  try:
    return client.key_value_try_get(key)
  except Exception as e:
    if "NOT_FOUND" in str(e):  # not written yet
      return None
    raise


def _stop(line: str) -> None:
  if _Watchdog.quiet:
    return
  print(f"jlora: {line}", file=sys.stderr, flush=True)
  os._exit(1)
