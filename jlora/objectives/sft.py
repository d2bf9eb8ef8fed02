"""Supervised fine-tuning (``jlora train``) as an objective of the shared run loop: token
cross-entropy over the data's masked-in tokens (``lm.lm_loss``), batches from the data
pipeline, held-out loss and (for tasks that can check answers) greedy accuracy.
"""

from __future__ import annotations

import jax

from jlora import data
from jlora.core import stack
from jlora.infra import mesh as mesh_lib
from jlora.objectives import lm
from jlora.run import build, config as config_lib, driver, evaluate, group, plug


def sft_objective(s: build.Setup) -> plug.Objective:
  """Supervised fine-tuning: token cross-entropy over the data's masked-in tokens; held
  out (before, every ``eval.every`` steps, after), the same loss and (for tasks that can
  check answers) greedy accuracy."""
  cfg = s.cfg
  loss = lm.lm_loss(s.model, s.plan, cfg.train.loss_chunk)
  # frozen passed as an argument: not baked into the program
  loss_fn = jax.jit(mesh_lib.traced_in(loss, s.mesh))
  held_out = [mesh_lib.global_batch(b, s.mesh) for b in evaluate.eval_batches(cfg, s.tok)]

  def eval_loss(trainable) -> dict:
    if not held_out:
      return {}
    sums = [loss_fn(trainable, s.frozen, b) for b in held_out]
    return {"eval_loss": float(sum(x for x, _ in sums) / max(sum(n for _, n in sums), 1.0))}

  # every eval.every steps too: a held-out accuracy curve, not two points
  metrics = evaluate.with_accuracy(s, eval_loss)
  return plug.Objective(loss, sft_batches(s), metrics, metrics)


def sft_batches(s: build.Setup) -> plug.DataBatches:
  """A run's training batches: its data pipeline on its mesh."""
  return plug.DataBatches(iter(data.dataset(s.cfg.data, s.tok)), s.mesh)


def sft_group(setups: list[build.Setup], st: stack.Stack, sources: list[plug.DataBatches],
              micro: int) -> plug.Objective:
  """``sft_objective`` for runs trained together (``jlora.run.group``): the stacked loss
  over micro-batches of one run each (``group.GroupBatches``); held out, each run's loss on
  its own batches through the same one-adapter program, and the greedy answers of every
  run asked in shared decodes (``evaluate.group_answers``)."""
  s0 = setups[0]
  loss = lm.stacked_lm_loss(s0.model, st, tuple(s.cfg.data.batch_size for s in setups),
                            s0.cfg.train.loss_chunk)
  loss_fn = jax.jit(mesh_lib.traced_in(loss, s0.mesh))
  held_out = evaluate.tagged([evaluate.eval_batches(s.cfg, s.tok) for s in setups], s0.mesh)

  def eval_loss(trainable, which) -> list[dict]:
    out = []
    for j in which:
      sums = [loss_fn(trainable, s0.frozen, b) for b in held_out[j]]
      total = sum(float(x[j]) for x, _ in sums)
      out.append({"eval_loss": total / max(sum(float(n[j]) for _, n in sums), 1.0)}
                 if held_out[j] else {})
    return out

  metrics = evaluate.with_group_accuracy(setups, st, eval_loss)
  return plug.Objective(loss, group.GroupBatches(sources, s0.mesh, micro), metrics, metrics)


SFT = driver.register(driver.Kind(
    "sft", "train", "train from a TOML recipe (see configs/)", "configs/quickstart.toml",
    build.Rules(), sft_objective, group=group.Group(sft_batches, sft_group)))


def run(cfg: config_lib.RunConfig, **kwargs) -> dict:
  """``jlora train``: ``driver.run`` with the SFT objective (same keyword arguments)."""
  return driver.run(cfg, SFT, **kwargs)


def advise(cfg: config_lib.RunConfig, pre: build.Preflight | None = None):
  """``jlora advise`` of an SFT recipe (``driver.advise``)."""
  return driver.advise(cfg, SFT, pre)
