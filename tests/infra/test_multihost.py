"""jlora.infra.multihost: joining a multi-process run: what is missing is named; an
unreachable coordinator is a clear error, not a hang."""

import subprocess
import sys
import time

import portpicker
import pytest

from tests.helpers import worker_env


def test_join_names_what_is_missing(monkeypatch):
  from jlora.infra import multihost
  for name in multihost.ENV.values():
    monkeypatch.delenv(name, raising=False)
  assert multihost.join("env") is False and not multihost.joined()  # single process
  monkeypatch.setenv("JLORA_COORDINATOR", "127.0.0.1:1234")
  with pytest.raises(ValueError, match="JLORA_NUM_PROCESSES, JLORA_PROCESS_ID not set"):
    multihost.join("env")
  with pytest.raises(ValueError, match="--distributed 'mpi'"):
    multihost.join("mpi")
  monkeypatch.setenv("JLORA_CPU_DEVICES", "0")
  with pytest.raises(ValueError, match="JLORA_CPU_DEVICES=0: must be >= 1"):
    multihost.cpu_devices()


def test_unreachable_coordinator_is_a_clear_error():
  port = portpicker.pick_unused_port()
  code = ("import jax; jax.config.update('jax_platforms', 'cpu');"
          "from jlora.infra import multihost as s;"
          f"s.initialize('127.0.0.1:{port}', 2, 1, timeout_s=5)")
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", code], env=worker_env(), capture_output=True,
                        timeout=120)
  assert proc.returncode != 0
  assert "could not join the distributed runtime at coordinator" in proc.stderr.decode()
  assert time.monotonic() - start < 90
