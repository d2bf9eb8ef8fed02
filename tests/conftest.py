import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Eight fake CPU devices for the sharding tests (single-device tests use device 0).
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def rng():
  return jax.random.PRNGKey(0)


def pytest_terminal_summary(terminalreporter):
  """Each executed notebook's time (tests that record ``notebook_seconds``)."""
  rows = [(report.nodeid, dict(report.user_properties)["notebook_seconds"])
          for reports in terminalreporter.stats.values() for report in reports
          if getattr(report, "when", None) == "call"
          and "notebook_seconds" in dict(getattr(report, "user_properties", ()))]
  if rows:
    terminalreporter.section("notebook times (CI's small parameters)")
    for nodeid, seconds in sorted(rows):
      terminalreporter.write_line(f"{seconds:7.1f} s  {nodeid}")
    terminalreporter.write_line(f"{sum(s for _, s in rows):7.1f} s  all notebooks")

