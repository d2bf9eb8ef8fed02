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
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

URL_SCHEMES = ("gs://", "s3://", "az://")


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
  with open(p + ".tmp", "wb") as f:
    f.write(data)
  os.replace(p + ".tmp", p)


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
  ``out`` must not exist, or be an empty directory (checked before anything is written)."""
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
    yield tmp
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
