"""Checkpoints of the trainable state only, with orbax.

One checkpoint = ``state`` (step, trainable {lora, full} and optimizer state: never the
frozen base), ``data`` (the grain iterator state: the exact next batch) and ``meta``
(step, metrics, RNG seed). Saves are asynchronous (the step loop goes on while arrays are
written) and atomic: orbax writes into a temporary directory and renames it only once
everything is on disk, so a crash mid-save leaves the previous checkpoints intact and the
half-written one is ignored (and cleaned up) by the next run. The last ``keep``
checkpoints are kept, plus the one with the lowest held-out loss.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jlora import atomic


class Checkpoints:

  def __init__(self, directory: str, keep: int = 3, *, asynchronous: bool = True):
    self.directory = atomic.absolute(directory)
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

  def save(self, step: int, state: Any, data_state: dict, meta: dict,
           eval_loss: float | None = None) -> None:
    """Start saving (returns before the arrays are written; ``wait`` blocks)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
    self._manager.save(step, args=args, metrics=metrics, force=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of every array: the restore target."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def size_bytes(directory: str) -> int | None:
  """Bytes of the files under a local ``directory`` (None on a cloud store: not listed)."""
  if atomic.is_url(directory):
    return None
  total = 0
  for root, _, files in os.walk(directory):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total
