"""What the benchmarks share: timing, the machine a number was measured on, memory probes,
a function run in a fresh process, and memory phase by phase of a run, from its events.

Peak memory is a number per process, so a memory bench runs each configuration it compares
in a process of its own (``call``, ``run``), and a run's phases come from the events its
loop emits (``jlora.run.events``), never from its log. JAX is imported only where it is
used: a child running torch alone (the PEFT and TRL peers) must not carry it, and a parent
must not start a backend (on a GPU: preallocate device memory) that only its children need.

    python -m bench.common MODULE FN '{"name": value, ...}'   # MODULE.FN(**kw) as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"JAX_PLATFORMS": "cpu"}  # a child's environment: JAX on the CPU whatever is installed

# --- timing ---------------------------------------------------------------------------


def median_ms(fn, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall time of ``fn()`` in ms; ``fn`` must block until its work is done."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def block(tree):
  import jax
  return jax.block_until_ready(tree)

# --- the machine ----------------------------------------------------------------------


def _memory_gb() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return round(kib / 2**20, 1)
  except (OSError, StopIteration):
    return None


def machine(devices: bool = True) -> dict:
  """What a result was measured on, to record beside it: what a study records
  (``jlora.study.report``: platform, CPU model, cores, devices and backend, versions of
  Python, JAX and the libraries jlora runs on) and the cores this process may use and the
  memory (GiB). ``devices`` starts JAX's backend: a parent whose children measure passes
  False, and the devices are left out."""
  from jlora.study import report
  affinity = getattr(os, "sched_getaffinity", None)
  seen = report.machine() if devices else {"platform": platform.platform(),
                                            "cpu": report.cpu_model(), "cores": os.cpu_count()}
  return {**seen, "usable_cores": len(affinity(0)) if affinity else os.cpu_count(),
          "memory_gb": _memory_gb(), "versions": report.versions()}


def machine_line(m: dict | None = None) -> str:
  """``machine()`` (or ``m``) as one line, for a bench's header."""
  m = machine() if m is None else m
  memory = f", {m['memory_gb']:.0f} GB" if m["memory_gb"] else ""
  devices = f"; {m['devices']}" if "devices" in m else ""
  return (f"{m['cpu']}, {m['usable_cores']} of {m['cores']} cores{memory}{devices}; "
          f"jax {m['versions']['jax']}")

def stamped(result: dict) -> dict:
  """``result`` with the ``machine()`` it was measured on, whose line is printed: a
  bench's first line of output."""
  result["machine"] = machine()
  print(machine_line(result["machine"]))
  return result


def save_json(result: dict, path: str | None) -> dict:
  """``result`` written to ``path`` as indented JSON when one is given; returns it."""
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
  return result

# --- memory probes (Linux) ------------------------------------------------------------

_peak_before_reset_mb = 0.0  # the high-water mark ``reset_peak`` cleared, highest so far


def status_mb(pid: int | str = "self") -> dict | None:
  """A process's memory now, from /proc/PID/status, in MiB: VmRSS (resident), VmHWM (its
  peak since it started or since ``reset_peak``), RssAnon (its own memory), RssFile (mapped
  files, e.g. a GGUF). None once the process is gone."""
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
          out[key] = int(value.split()[0]) / 1024
  except (FileNotFoundError, ProcessLookupError):
    return None
  return out or None


def reset_peak() -> None:
  """Restart the kernel's peak-RSS counter of this process (VmHWM; writing 5 to
  /proc/self/clear_refs, Linux >= 4.0), so what follows is measured on its own. The kernel
  resets ``ru_maxrss`` with it: ``peak_rss_mb`` keeps the peak it cleared."""
  global _peak_before_reset_mb
  _peak_before_reset_mb = peak_rss_mb()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def peak_rss_mb() -> float:
  """This process's peak RSS since it started (MiB), ``reset_peak`` or not: the highest of
  ``ru_maxrss``, VmHWM (the two round apart) and the peaks ``reset_peak`` cleared."""
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  return max(maxrss, (status_mb() or {}).get("VmHWM", 0.0), _peak_before_reset_mb)


def release_freed_heap() -> None:
  """Hand the heap that was freed back to the OS (glibc keeps it otherwise, where it counts
  against whatever is measured next)."""
  import ctypes
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


def device_memory_mb() -> dict | None:
  """The first JAX device's memory in use and its peak (MiB) as its runtime counts them;
  None where it counts none (XLA:CPU) or this process has not imported JAX (then it holds
  no device memory: a probe does not start a backend)."""
  if "jax" not in sys.modules:
    return None
  import jax
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {"device_in_use_mb": stats.get("bytes_in_use", 0) / 2**20,
          "device_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20}

# --- a function in a fresh process ----------------------------------------------------


class ChildFailed(RuntimeError):
  """A child process exited non-zero; the message ends with its output's last lines."""


@dataclasses.dataclass
class Child:
  """A finished child: ``result`` (its function's, through JSON), its output (stdout and
  stderr, interleaved), its start on ``time.monotonic()`` (the clock of the run's events)
  and, when it was sampled, ``samples``: ``[(time.monotonic(), status_mb(child))]``."""
  result: Any
  output: list[str]
  start: float
  samples: list[tuple[float, dict]]


def run(module: str, fn: str, /, *, env: dict | None = None, sample_every: float | None = None,
        **kwargs) -> Child:
  """``module.fn(**kwargs)`` in a fresh Python process started at the repository root, with
  ``env`` over this process's environment; the arguments and the result go through JSON
  (so ``fn`` takes no argument named ``env`` or ``sample_every``). ``sample_every``
  (seconds): the child's memory is sampled that often while it runs. Raises
  ``ChildFailed`` when it exits non-zero or without a result (``sys.exit(0)`` inside)."""
  with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
    result_path = os.path.join(tmp, "result.json")
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.common", module, fn, "-", "--result", result_path],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path, **(env or {})}, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []

    def read():
      for line in proc.stdout:
        output.append(line.rstrip("\n"))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
      proc.stdin.write(json.dumps(kwargs))
      proc.stdin.close()
    except BrokenPipeError:  # it died before reading them: its exit code and output say why
      pass
    samples = []
    while proc.poll() is None:
      status = status_mb(proc.pid) if sample_every else None
      if status:
        samples.append((time.monotonic(), status))
      time.sleep(sample_every or 0.05)
    reader.join(timeout=5)
    if proc.returncode or not os.path.exists(result_path):
      raise ChildFailed(f"{module}.{fn} failed (exit {proc.returncode}" +
                        ("" if proc.returncode else ", no result") + "):\n" +
                        "\n".join(output[-40:]))
    with open(result_path) as f:
      return Child(json.load(f), output, start, samples)


def call(module: str, fn: str, /, *, env: dict | None = None, **kwargs) -> Any:
  """``run(...).result``: ``module.fn(**kwargs)``'s result from a fresh process."""
  return run(module, fn, env=env, **kwargs).result


def jlora(argv: list[str], *, env: dict | None = None, sample_every: float | None = None
          ) -> Child:
  """The ``jlora`` command with ``argv`` in a fresh process (``run``); ``ChildFailed`` when
  its exit code is not 0, as a user's shell would see it."""
  child = run("jlora.cli", "main", env=env, sample_every=sample_every, argv=argv)
  if child.result:
    raise ChildFailed(f"jlora {' '.join(argv)} failed (exit {child.result}):\n" +
                      "\n".join(child.output[-40:]))
  return child


def _child_main(argv=None) -> int:
  p = argparse.ArgumentParser(description="MODULE.FN(**KWARGS) in this process, as JSON.")
  p.add_argument("module")
  p.add_argument("fn")
  p.add_argument("kwargs", help="a JSON object, or - to read it from stdin")
  p.add_argument("--result", help="write the result to this file instead of stdout")
  args = p.parse_args(argv)
  kwargs = json.loads(sys.stdin.read() if args.kwargs == "-" else args.kwargs)
  result = json.dumps(getattr(importlib.import_module(args.module), args.fn)(**kwargs))
  if args.result:
    with open(args.result, "w") as f:
      f.write(result)
  else:
    print(result)
  return 0

# --- memory by phase of a run (jlora.run.events) --------------------------------------


class PhasePeaks:
  """A listener (``driver.run(on_event=)``) for a run in this process that measures each
  phase on its own: at a phase's start the heap freed before it goes back to the OS and the
  peak counter restarts. ``finish()``: per phase its name, start, seconds, RSS at its start
  and peak RSS (MiB), and the device's peak so far where JAX counts one."""

  def __init__(self):
    self.rows: list[dict] = []

  def __call__(self, event) -> None:
    if event.kind != "phase":
      return
    self._close(event.time)
    release_freed_heap()
    self.rows.append({"phase": event.name, "start": event.time,
                      "rss_at_start_mb": status_mb()["VmRSS"]})
    reset_peak()

  def _close(self, now: float) -> None:
    if self.rows and "seconds" not in self.rows[-1]:
      self.rows[-1].update(seconds=now - self.rows[-1]["start"],
                           peak_rss_mb=status_mb()["VmHWM"], **(device_memory_mb() or {}))

  def finish(self) -> list[dict]:
    """The rows, the last phase ending now."""
    self._close(time.monotonic())
    return self.rows

  def peak_from(self, phase: str) -> float:
    """The peak RSS (MiB) from ``phase``'s start to the end (after ``finish``)."""
    names = [r["phase"] for r in self.rows]
    return max(r["peak_rss_mb"] for r in self.rows[names.index(phase):])


def phase_rows(child: Child, events) -> list[dict]:
  """Per phase of a sampled child (``run(sample_every=)``): its seconds, peak RSS, and its
  anonymous RSS at the start and at the peak (MiB). The phases are those the child's
  ``events`` mark (``jlora.run.events``, e.g. ``events.read`` of its ``--events`` file),
  "start" before the first; a phase no sample fell in is left out."""
  marks = ([(child.start, "start")] + [(e.time, e.name) for e in events if e.kind == "phase"]
           + [(float("inf"), None)])
  out = []
  for (t0, name), (t1, _) in zip(marks, marks[1:]):
    inside = [s for t, s in child.samples if t0 <= t < t1]
    if inside:
      out.append({"phase": name, "seconds": min(t1, child.samples[-1][0]) - t0,
                  "peak_rss_mb": max(s["VmRSS"] for s in inside),
                  "peak_anon_mb": max(s["RssAnon"] for s in inside),
                  "anon_at_start_mb": inside[0]["RssAnon"]})
  return out


if __name__ == "__main__":
  sys.exit(_child_main())
