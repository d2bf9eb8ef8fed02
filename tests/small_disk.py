"""A real full disk for the storage-failure tests (the ``small_disk`` fixture mounts it; a
jlora subprocess can fill it too: this module imports nothing of jax's)."""

import os


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
