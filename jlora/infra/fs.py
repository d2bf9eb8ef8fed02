"""Files written so that a crash never leaves half of one, through one path layer.

Run directories may live on a cloud store (``gs://bucket/run``: pod hosts share no disk),
so every read and write of a run directory's files goes through ``etils.epath`` (what
orbax itself uses): local paths and gs:// / s3:// URLs alike. A single file goes to
``PATH.tmp`` and is renamed over ``PATH`` on a local disk; an object store publishes an
object only once it is completely written, so there it is written in place
(``write_text``, ``write_json``). ``Appender`` appends lines (metrics), rewriting the whole
object on stores that cannot append. A directory is built in a temporary directory beside
its destination and renamed into place only when complete (``staging``; local only). Used
by the run directory, studies, PEFT export and merged checkpoints.

A write that fails for a reason outside jlora (a full disk, a quota, a read-only or
vanished file system) is a ``StorageError``: a ``ValueError``, so the CLI prints one line
naming the path and the reason instead of a traceback (``storage_reason`` recognises
them, whether Python, orbax or TensorStore raised them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

URL_SCHEMES = ("gs://", "s3://", "az://")

_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EIO: "input/output error"}


class StorageError(ValueError):
  """A write failed for a reason outside jlora (see the module docstring)."""


def storage_reason(e: BaseException) -> str | None:
  """"no space left on device (PATH)" and the like when ``e`` (or what caused it) is a
  storage failure; None for anything else (a bug keeps its traceback). TensorStore, which
  orbax writes arrays with, reports a full disk as ``RESOURCE_EXHAUSTED`` in a
  ValueError's text rather than as an OSError."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _REASONS:
      where = f" ({e.filename})" if e.filename else ""
      return _REASONS[e.errno] + where
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "No space left on device" in text:
      return "no space left on device"
    e = e.__cause__ or e.__context__
  return None


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
  """A storage failure inside the block becomes ``StorageError("{what}: {reason}")``."""
  try:
    yield
  except StorageError:
    raise
  except Exception as e:  # noqa: BLE001 (only storage failures are converted)
    reason = storage_reason(e)
    if reason is None:
      raise
    raise StorageError(f"{what}: {reason}") from None


def is_url(path: str) -> bool:
  return str(path).startswith(URL_SCHEMES)


def path(p: str) -> epath.Path:
  return epath.Path(p)


def absolute(p: str) -> str:
  """``p`` made absolute (URLs are already)."""
  return str(p) if is_url(p) else os.path.abspath(p)


def join(*parts: str) -> str:
  return str(epath.Path(parts[0]).joinpath(*parts[1:]))


def exists(p: str) -> bool:
  return epath.Path(p).exists()


def is_dir(p: str) -> bool:
  return epath.Path(p).is_dir()


def is_file(p: str) -> bool:
  q = epath.Path(p)
  return q.exists() and not q.is_dir()


def listdir(p: str) -> list[str]:
  """Names in directory ``p`` ([] if it does not exist)."""
  q = epath.Path(p)
  return sorted(c.name for c in q.iterdir()) if q.is_dir() else []


def makedirs(p: str) -> None:
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: str) -> str:
  return epath.Path(p).read_text()


def read_json(p: str):
  return json.loads(read_text(p))


def write_text(p: str, text: str) -> None:
  """``text`` at ``p``, atomically: a reader (or a resumed run) sees the old file or
  the whole new one, never an empty or half-written one."""
  write_bytes(p, text.encode())


def write_bytes(p: str, data: bytes) -> None:
  """``data`` at ``p``, atomically (``write_text``)."""
  if is_url(p):  # an object appears only once completely written
    epath.Path(p).write_bytes(data)
    return
  try:
    with open(p + ".tmp", "wb") as f:
      f.write(data)
    os.replace(p + ".tmp", p)
  except BaseException as e:  # a full disk: no half-written .tmp left behind
    with contextlib.suppress(OSError):
      os.remove(p + ".tmp")
    if isinstance(e, OSError) and e.filename is None:  # name the file the write was for
      raise OSError(e.errno, e.strerror, p) from e
    raise


def write_json(p: str, value) -> None:
  """``value`` as indented JSON at ``p``, atomically."""
  write_text(p, json.dumps(value, indent=2))


class Appender:
  """Lines appended to a file, each flushed as it is written. A local file is opened in
  append mode; an object store (no appends) gets the whole text rewritten each time."""

  def __init__(self, p: str):
    self.path = p
    if is_url(p):
      self._text, self._file = (read_text(p) if exists(p) else ""), None
    else:
      self._text, self._file = None, open(p, "a")

  def write(self, text: str) -> None:
    if self._file is not None:
      self._file.write(text)
      self._file.flush()
    else:
      self._text += text
      write_text(self.path, self._text)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


@contextlib.contextmanager
def staging(out: str) -> Iterator[str]:
  """A temporary directory beside ``out``, renamed to ``out`` only if the block succeeds.
  ``out`` must not exist, or be an empty directory (checked before anything is written).
  A storage failure (a full disk) removes the partial output and is a ``StorageError``."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"output {out} already exists and is not an empty directory")
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
  except OSError as e:
    raise ValueError(f"cannot write to {parent}: {e.strerror}") from None
  try:
    with writing(f"cannot write {out} (nothing was written)"):
      yield tmp
      if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
      os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staging_file(out: str) -> Iterator[str]:
  """A temporary file name beside ``out``, renamed to ``out`` only if the block succeeds
  (``staging`` for one file). ``out`` must not exist (checked before anything is
  written); a storage failure removes the partial file and is a ``StorageError``."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ValueError(f"output {out} already exists")
  parent = os.path.dirname(out)
  try:
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    os.close(fd)
  except OSError as e:
    raise ValueError(f"cannot write to {parent}: {e.strerror}") from None
  try:
    with writing(f"cannot write {out} (nothing was written)"):
      yield tmp
      os.replace(tmp, out)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)
