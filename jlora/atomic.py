"""Files written so that a crash never leaves half of one: a single file goes to
``PATH.tmp`` and is renamed over ``PATH`` (``write_text``, ``write_json``); a directory
is built in a temporary directory beside its destination and renamed into place only when
complete (``staging``). Used by the run directory, studies, PEFT export and merged
checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator


def write_text(path: str, text: str) -> None:
  """``text`` at ``path``, atomically: a reader (or a resumed run) sees the old file or
  the whole new one, never an empty or half-written one."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def write_json(path: str, value) -> None:
  """``value`` as indented JSON at ``path``, atomically."""
  write_text(path, json.dumps(value, indent=2))


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
