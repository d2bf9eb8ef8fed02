"""The run directory: checked, locked and created, and the final adapters written into it
(its metrics files: ``jlora.run.metrics``; a trained run read back: ``jlora.run.trained``).
Files are written atomically (``jlora.infra.fs``), so a crash never leaves half of one.

    RUN_DIR/config.json      the resolved config (what --resume and jlora generate read)
    RUN_DIR/.lock            held by the one run training in this directory
    RUN_DIR/start.json       held-out loss / accuracy before training
    RUN_DIR/metrics.jsonl    one line per logged step, step 0 = before training (and
                             metrics.csv, tb/ for TensorBoard)
    RUN_DIR/checkpoints/N/   orbax: trainable state, optimizer, data iterator, meta
    RUN_DIR/adapters.safetensors  the final LoRA factors (flat "path/a", "path/b")
    RUN_DIR/summary.json     loss and accuracy before/after, throughput, sizes

Nothing existing is overwritten: a fresh run refuses a directory holding a run (one with a
checkpoint, or files jlora does not write; what a start that saved no step leaves is taken
over), ``--resume`` refuses a changed model, LoRA spec, method, data or objective section
(naming the keys), and metrics logged after the last checkpoint (by a run that was killed)
are dropped when it resumes, so the files always describe the one trajectory the
checkpoints continue. ``check`` writes nothing; ``create`` is a run's first write (where
each sits in a run: docs/ARCHITECTURE.md, "A run, and where an objective plugs in").

RUN_DIR may be a local path or a cloud-storage URL (``gs://...``: pod hosts share no
disk); every file goes through ``jlora.infra.fs``'s path layer. In a multi-process run,
process 0 writes these files and holds the lock; every process takes part in orbax's
checkpoints and reads config.json and start.json.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from jlora.core import lora
from jlora.infra import fs, multihost
from jlora.run import checkpoint, config as config_lib

# Config keys that must not change across --resume (they define the state on disk), and
# every objective's own section (``config.SECTIONS``): it defines the trajectory as much as
# the data does.
_FROZEN_ON_RESUME = ("model", "lora", "train.method", "train.seed", "data", "mesh")
LOCK_FILE = ".lock"


def _get(tree: dict, key: str):
  for part in key.split("."):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def _changes(before: Any, now: Any, prefix: str) -> list[str]:
  """``["lora.rank: 16 -> 8", ...]``: every leaf key whose value differs."""
  if isinstance(before, dict) and isinstance(now, dict):
    return [c for k in sorted(set(before) | set(now))
            for c in _changes(before.get(k), now.get(k), f"{prefix}.{k}" if prefix else k)]
  return [] if before == now else [f"{prefix}: {json.dumps(before)} -> {json.dumps(now)}"]


def _same_model(before: Any, now: Any) -> bool:
  """Whether two ``model.path`` values name the same files: the smollm2 alias or a Hub id
  and the path it resolves to are the same model (a run resumes under either name)."""
  if before == now:
    return True
  if not (isinstance(before, str) and isinstance(now, str)):
    return False
  from jlora import models
  try:
    return os.path.realpath(models.resolve(before)) == os.path.realpath(models.resolve(now))
  except ValueError:  # one of them no longer resolves: a change
    return False


# What a start writes before its first checkpoint. A directory holding only these (and no
# checkpoint step) is a start that saved nothing: killed, failed (a reward raising in the
# first evaluation, a full disk) or stopped before step 1 was saved. A plain rerun takes
# it over: nothing in it can be resumed.
_START_FILES = ("config.json", "start.json", "metrics.jsonl", "metrics.csv", "tb",
                "checkpoints", LOCK_FILE)


def _holds_run(run_dir: str) -> bool:
  """Whether ``run_dir`` holds anything but what a start that saved no step leaves
  (``_START_FILES``, ``.tmp`` files of atomic writes)."""
  names = fs.listdir(run_dir)
  if any(f not in _START_FILES and not f.endswith(".tmp") for f in names):
    return True
  return bool(checkpoint.steps(run_dir))


def clear_start(run_dir: str) -> None:
  """Remove the metrics, TensorBoard events and start.json of a start that saved no step,
  which would otherwise mix with the new run's (config.json is rewritten by ``create``;
  orbax removes its own unfinished checkpoint directories)."""
  for name in ("start.json", "metrics.jsonl", "metrics.csv", "tb"):
    p = fs.path(fs.join(run_dir, name))
    if not p.exists():
      continue
    if p.is_dir():
      p.rmtree()
    else:
      p.unlink()


def check(cfg: config_lib.RunConfig, resume: bool) -> str:
  """What can be said about the run directory before any work (nothing is written):
  a fresh run needs an empty or missing directory; ``--resume`` needs a run of the same
  config; neither may start while another process holds the directory."""
  run_dir = fs.absolute(cfg.run_dir)
  saved = fs.join(run_dir, "config.json")
  if fs.is_dir(run_dir) and (holder := Lock.holder(run_dir)):
    raise ValueError(f"{run_dir} is in use by {holder}")
  if resume:
    if not fs.is_file(saved):
      raise ValueError(f"{run_dir}: nothing to resume (no config.json)")
    try:
      before = fs.read_json(saved)
    except ValueError as e:
      raise ValueError(f"{saved}: not a readable run config ({e})") from None
    now = cfg.to_dict()
    if _same_model(_get(before, "model.path"), _get(now, "model.path")):
      now["model"]["path"] = before["model"]["path"]
    changed = [c for key in _FROZEN_ON_RESUME + tuple(config_lib.SECTIONS)
               for c in _changes(_get(before, key), _get(now, key), key)]
    if changed:
      raise ValueError(f"cannot resume {run_dir}: changed since it started: "
                       f"{'; '.join(changed)}")
  elif _holds_run(run_dir):
    raise ValueError(f"{run_dir} already holds a run: add --resume to continue it, or "
                     "set run_dir to a new directory")
  elif fs.exists(run_dir) and not fs.is_dir(run_dir):
    raise ValueError(f"{run_dir}: cannot write the run directory (not a directory)")
  return run_dir


class Lock:
  """One trainer per run directory, held for the whole run by process 0.

  On a local or network file system: an exclusive ``flock`` on RUN_DIR/.lock; the OS drops
  it when the process dies (however it dies), so a lock left by a dead process never
  blocks; the pid and command inside only name the holder. On a cloud store (no locks):
  an advisory .lock naming the holder, rewritten every ``REFRESH_S`` by a thread and
  removed at the end; a start is refused while it is younger than ``STALE_S``. Two starts
  within the same few seconds can both pass there: the store offers no exclusive create.
  """

  REFRESH_S, STALE_S = 60, 300

  def __init__(self, run_dir: str):
    self._path, self._fd, self._stop = fs.join(run_dir, LOCK_FILE), None, None
    if fs.is_url(run_dir):
      self._write_remote()
      self._stop = threading.Event()
      threading.Thread(target=self._refresh, daemon=True, name="jlora-lock").start()
      return
    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      raise ValueError(f"{run_dir} is in use by {Lock.holder(run_dir) or 'another process'}"
                       ) from None
    os.ftruncate(self._fd, 0)
    os.write(self._fd, json.dumps(_holder_info()).encode())

  def _write_remote(self) -> None:
    fs.write_json(self._path, {**_holder_info(), "time": time.time()})

  def _refresh(self) -> None:
    while not self._stop.wait(self.REFRESH_S):
      self._write_remote()

  @staticmethod
  def holder(run_dir: str) -> str | None:
    """"process 1234 on HOST (jlora train x.toml)" if a live run holds the lock, else
    None."""
    path = fs.join(run_dir, LOCK_FILE)
    if not fs.is_file(path):
      return None
    if fs.is_url(run_dir):
      try:
        info = fs.read_json(path)
      except ValueError:
        return None
      return _describe(info) if time.time() - info.get("time", 0) < Lock.STALE_S else None
    fd = os.open(path, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
      return None  # nobody holds it
    except BlockingIOError:
      try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
      except ValueError:
        info = {}
      return _describe(info)
    finally:
      os.close(fd)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock
      self._fd = None
    if self._stop is not None:
      self._stop.set()
      self._stop = None
      fs.path(self._path).unlink(missing_ok=True)


def _holder_info() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv}


def _describe(info: dict) -> str:
  argv = " ".join([os.path.basename(info.get("argv", ["?"])[0])] + info.get("argv", [])[1:])
  host = f" on {info['host']}" if info.get("host") else ""
  return f"process {info.get('pid', '?')}{host} ({argv})"


class _NoLock:
  """What processes other than 0 hold."""

  def release(self) -> None:
    pass


def create(cfg: config_lib.RunConfig, resume: bool) -> tuple[str, Lock | _NoLock]:
  """Take the run directory (``check`` again, then lock it; a fresh run writes
  config.json). Call only once everything else is validated. Every process calls it:
  all check before process 0 writes, and all return once it has."""
  run_dir = check(cfg, resume)
  multihost.barrier("run_dir_checked")
  if not multihost.primary():
    multihost.barrier("run_dir_created")
    return run_dir, _NoLock()
  try:
    fs.makedirs(run_dir)
    lock = Lock(run_dir)
  except OSError as e:
    raise ValueError(f"{run_dir}: cannot write the run directory ({e.strerror})") from None
  try:
    if not resume:
      if _holds_run(run_dir):  # another process got here first
        raise ValueError(f"{run_dir} already holds a run: add --resume to continue it")
      with fs.writing(f"cannot write the run directory {run_dir}"):
        clear_start(run_dir)
        # atomic: a process killed here must not leave an empty config.json that a
        # resume (or a study's next invocation) would then fail to read
        fs.write_text(fs.join(run_dir, "config.json"), cfg.to_json())
  except BaseException:
    lock.release()
    raise
  multihost.barrier("run_dir_created")
  return run_dir, lock


def save_adapters(path: str, adapters: Any, spec: lora.LoraSpec) -> None:
  """The adapters as safetensors (a collective: every process calls it; process 0 writes)."""
  from safetensors.numpy import save
  flat = {p: np.asarray(x) for p, x in lora.flatten(multihost.to_host(adapters)).items()}
  if multihost.primary():
    fs.write_bytes(path, save(flat, metadata={"format": "jlora", "rank": str(spec.rank),
                                                  "alpha": str(spec.alpha)}))
