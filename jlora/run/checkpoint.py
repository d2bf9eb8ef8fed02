"""Checkpoints of the trainable state only, with orbax.

One checkpoint = ``state`` (step, trainable {lora, full} and optimizer state: never the
frozen base), ``data`` (the grain iterator state: the exact next batch) and ``meta``
(step, metrics, RNG seed). Saves are asynchronous (the step loop goes on while arrays are
written) and atomic: orbax writes into a temporary directory and renames it only once
everything is on disk, so a crash mid-save leaves the previous checkpoints intact and the
half-written one is ignored (and cleaned up) by the next run. The last ``keep``
checkpoints are kept, plus the one with the lowest held-out loss.

A save that cannot succeed is a ``SaveFailed`` naming the step, the reason and the last
good checkpoint. A local disk without room for the checkpoint's arrays is refused before
anything is written (so training stops at that step, with no partial checkpoint); a write
that fails later anyway (the disk filled up meanwhile) is raised by the first ``poll``
(the loop polls every step, without blocking) or ``wait`` after orbax's writer threads
give up, and their own logged tracebacks of it are dropped, so the user sees one line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jlora.infra import fs, multihost
from jlora.run import train_step


class SaveFailed(fs.StorageError):
  """Checkpoint ``step`` could not be written; ``last_good``: the newest step on disk."""

  def __init__(self, step: int, directory: str, reason: str, last_good: int | None):
    self.step, self.last_good = step, last_good
    super().__init__(f"checkpoint step {step} could not be saved in {directory}: {reason}")


class _DropOrbaxStorageTracebacks(logging.Filter):
  """Drops orbax's error records of a storage failure: it logs a failed write from each
  of its writer threads, with a traceback, while ``Checkpoints`` raises the failure itself,
  once. Other orbax messages pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and
                ("orbax" in record.pathname or "orbax" in record.getMessage()) and
                record.exc_info and fs.storage_reason(record.exc_info[1]))


def _closed_loop_callback(unraisable) -> bool:
  """TensorStore finishing a write that orbax abandoned after a failure calls back into
  orbax's event loop, already closed: "Event loop is closed", reported as unraisable."""
  e = unraisable.exc_value
  return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


@functools.cache
def _quiet_storage_failures() -> None:
  """Installed with the first ``Checkpoints``: the filters above, and an unraisable hook
  that drops ``_closed_loop_callback`` (everything else goes to the previous hook)."""
  logging.getLogger("absl").addFilter(_DropOrbaxStorageTracebacks())
  # asyncio's "Task exception was never retrieved", for writes orbax abandoned
  logging.getLogger("asyncio").addFilter(_DropOrbaxStorageTracebacks())
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _closed_loop_callback(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook

_SPACE_MARGIN = 1 << 19  # metadata and JSON files beside the arrays (a block each)


class Checkpoints:

  def __init__(self, directory: str, keep: int = 3, *, asynchronous: bool = True):
    _quiet_storage_failures()
    self.directory = fs.absolute(directory)
    preserve = policies.AnyPreservationPolicy([
        policies.LatestN(keep),
        policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                       keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preserve, enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)
    self._pending: int | None = None  # the step being written in the background
    self._failed = False

  @contextlib.contextmanager
  def _saving(self, step: int):
    """A storage failure while writing ``step`` becomes ``SaveFailed``."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 (only storage failures are converted)
      reason = fs.storage_reason(e)
      if reason is None:
        raise
      self._failed, self._pending = True, None
      raise SaveFailed(step, self.directory, reason, self.latest_step()) from None

  def save(self, step: int, state: Any, data_state: dict, meta: dict,
           eval_loss: float | None = None) -> None:
    """Start saving (returns before the arrays are written; ``wait`` blocks). A previous
    save still in flight is waited for first (so its failure is reported as its own)."""
    self.wait()
    self._check_space(step, state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    with self._saving(step):
      self._pending = step
      self._manager.save(step, args=args, metrics=metrics, force=True)

  def _check_space(self, step: int, state: Any) -> None:
    """``SaveFailed`` now, before orbax writes anything, if the local disk lacks room for
    the arrays (stored uncompressed or nearly: the estimate errs towards refusing)."""
    if fs.is_url(self.directory):
      return  # object stores report no free space
    need = sum(x.nbytes for x in jax.tree_util.tree_leaves(state) if hasattr(x, "nbytes"))
    need += _SPACE_MARGIN
    existing = self.directory
    while not os.path.isdir(existing):
      existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < need:
      raise SaveFailed(step, self.directory,
                       f"no space left on device ({free / 2**20:.1f} MiB free, the "
                       f"checkpoint needs ~{need / 2**20:.1f} MiB)", self.latest_step())

  def poll(self) -> None:
    """Raise ``SaveFailed`` if the save in the background has failed; never blocks."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def drop_after(self, step: int) -> None:
    """Delete every checkpoint after ``step``: a run resumed from ``step`` saves those
    steps anew (a group resumes from the last step all its runs saved)."""
    for later in self.all_steps():
      if later > step:
        self._manager.delete(later)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
    """``(state, data_state, meta)`` of ``step`` (default: latest), arrays placed with the
    shardings of ``abstract_state`` (a tree of ``jax.ShapeDtypeStruct``)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{self.directory}: no checkpoint to resume from")
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def stored_bytes(self, step: int) -> int:
    """Bytes of the arrays a checkpoint holds (from its metadata; nothing is loaded)."""
    tree = self._manager.item_metadata(step)["state"]
    return sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
               for m in jax.tree_util.tree_leaves(tree))

  def wait(self) -> None:
    """Block until the save in flight is on disk; ``SaveFailed`` if it could not be."""
    step = self._pending
    if step is None:
      return
    with self._saving(step):
      self._manager.wait_until_finished()
    self._pending = None
    committed = step in self._manager.all_steps() and (
        fs.is_url(self.directory) or os.path.isdir(os.path.join(self.directory, str(step))))
    if not committed:  # orbax logged the failure itself and went on
      self._failed = True
      raise SaveFailed(step, self.directory, "orbax did not finalize it (see the log above)",
                       self.latest_step())

  def close(self) -> None:
    """Wait for the save in flight, then release orbax's threads. After a failure (already
    raised) nothing is raised again."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001
        if not self._failed:
          raise


class StorageFailed(fs.StorageError):
  """The run could not write to its directory (a full disk). ``step``: the last good
  checkpoint, which ``--resume`` continues (None: no step was saved, so a plain rerun of
  the same command starts over: ``rundir.check`` lets it)."""

  def __init__(self, message: str, step: int | None):
    self.step = step
    super().__init__(message)


@contextlib.contextmanager
def storage_failures(run_dir: str) -> Iterator[None]:
  """A storage failure inside the block becomes ``StorageFailed`` with the last good
  checkpoint found on disk."""
  try:
    yield
  except StorageFailed:
    raise
  except Exception as e:  # noqa: BLE001 (only storage failures are converted)
    if isinstance(e, SaveFailed):
      what = str(e)
    elif (reason := fs.storage_reason(e)) is not None:
      what = f"cannot write to {run_dir}: {reason}"
    else:
      raise
    done = steps(run_dir)
    last = done[-1] if done else None
    raise StorageFailed(
        f"{what}; training stopped, " +
        ("no step was saved (free space, then run the same command again)" if last is None
         else f"the last good checkpoint is step {last} (free space, then resume)"),
        last) from None


def positions(state: dict) -> dict:
  """A batch source's position (``get_state()``) as a checkpoint stores it: every
  process's, when there are several (each reads its own rows; orbax writes JSON from
  process 0 only). A collective: every process calls it."""
  if multihost.processes() == 1:
    return state
  return {"processes": multihost.gather_json(state)}


def own_positions(saved: dict) -> dict:
  """This process's batch-source position from what ``positions`` stored; a checkpoint of
  another process count is a one-line error."""
  if "processes" not in saved:
    if multihost.processes() > 1:
      raise ValueError("the checkpoint was written by a single process: resume it with one")
    return saved
  states = saved["processes"]
  if len(states) != multihost.processes():
    raise ValueError(f"the checkpoint was written by {len(states)} processes, this run has "
                     f"{multihost.processes()}: resume it with {len(states)}")
  return states[jax.process_index()]


def directory(run_dir: str) -> str:
  """Where a run directory keeps its checkpoints."""
  return fs.join(run_dir, "checkpoints")


def steps(run_dir: str) -> list[int]:
  """A run's committed checkpoint steps on disk (orbax's temporary directories are not
  steps)."""
  return sorted(int(d) for d in fs.listdir(directory(run_dir)) if d.isdigit())


def remove(run_dir: str) -> None:
  """Delete a run's checkpoints (a finished study arm keeps its metrics and adapters)."""
  path = fs.path(directory(run_dir))
  if path.exists():
    path.rmtree()


def restore_trainable(run_dir: str, s, step: int | None = None) -> tuple[Any, int]:
  """(trainable state, its step) of checkpoint ``step`` (default: the latest) of a run
  built as ``s`` (a ``build.Setup``), placed with its shardings."""
  ckpts = Checkpoints(directory(run_dir), keep=s.cfg.train.keep)
  try:
    state = train_step.init_state(s.trainable, s.tx, s.mesh)
    state, _, meta = ckpts.restore(abstract(state), step)
  finally:
    ckpts.close()
  return state["trainable"], int(meta["step"])


def abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of every array: the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def size_bytes(directory: str) -> int | None:
  """Bytes of the files under a local ``directory`` (None on a cloud store: not listed)."""
  if fs.is_url(directory):
    return None
  total = 0
  for root, _, files in os.walk(directory):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
