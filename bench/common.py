"""Timing helpers shared by the benchmarks (medians over repeats, after warm-up)."""

import platform
import statistics
import time

import jax


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


def machine() -> str:
  devices = jax.devices()
  return (f"{platform.machine()} {platform.processor() or ''} "
          f"{len(devices)}x {devices[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}").replace("  ", " ")


def block(tree):
  return jax.block_until_ready(tree)
