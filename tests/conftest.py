import os
import subprocess

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



class SmallDisk:
  """A 4 MiB tmpfs at ``path``; ``fill(free_kib)`` leaves that much room, ``empty()``
  frees it again."""

  def __init__(self, path):
    self.path = path
    self._filler = path / ".filler"

  def fill(self, free_kib: int) -> None:
    self.empty()
    st = os.statvfs(self.path)
    with open(self._filler, "wb") as f:
      f.write(b"\0" * (st.f_bavail * st.f_frsize - free_kib * 1024))

  def empty(self) -> None:
    self._filler.unlink(missing_ok=True)

  def files(self) -> list[str]:
    """Every file and directory on the disk but the filler, relative to it."""
    return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*")
                  if p != self._filler)


@pytest.fixture
def small_disk(tmp_path):
  """A real full disk for the storage-failure tests: a tmpfs mounted for the test (CI runs
  as root, as this project's machines do)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"a small disk needs mounting a tmpfs: {done.stderr.strip()}")
  try:
    yield SmallDisk(mount)
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=True)
