"""Supervised fine-tuning (``jlora train``) as an objective of the shared run loop: token
cross-entropy over the data's masked-in tokens (``lm.lm_loss``), batches from the data
pipeline, held-out loss and (for tasks that can check answers) greedy accuracy.
"""

from __future__ import annotations

import jax
import numpy as np

from jlora import data
from jlora.core import optim, stack
from jlora.infra import mesh as mesh_lib
from jlora.objectives import lm
from jlora.run import build, config as config_lib, driver, evaluate, group, loop


def sft_objective(s: build.Setup) -> loop.Objective:
  """Supervised fine-tuning: token cross-entropy over the data's masked-in tokens; held
  out, the same loss and (for tasks that can check answers) greedy accuracy."""
  cfg = s.cfg
  loss = lm.lm_loss(s.model, s.plan, cfg.train.loss_chunk)
  # frozen passed as an argument: not baked into the program
  loss_fn = jax.jit(mesh_lib.traced_in(loss, s.mesh))
  held_out = [mesh_lib.global_batch(b, s.mesh) for b in evaluate.eval_batches(cfg, s.tok)]
  task, records = evaluate.task_records(cfg)

  def eval_loss(trainable) -> dict:
    if not held_out:
      return {}
    sums = [loss_fn(trainable, s.frozen, b) for b in held_out]
    return {"eval_loss": float(sum(x for x, _ in sums) / max(sum(n for _, n in sums), 1.0))}

  def held_out_metrics(trainable) -> dict:
    out = eval_loss(trainable)
    if records:
      out["accuracy"] = mesh_lib.traced_in(evaluate.accuracy, s.mesh)(
          s.model, optim.model_params(trainable, s.frozen, s.plan), s.tok, cfg.data,
          records, task, cfg.eval.max_new_tokens)
    return out

  return loop.Objective(loss, sft_batches(s), held_out_metrics, eval_loss)


def sft_batches(s: build.Setup) -> loop.DataBatches:
  """A run's training batches: its data pipeline on its mesh."""
  return loop.DataBatches(iter(data.dataset(s.cfg.data, s.tok)), s.mesh)


def sft_group(setups: list[build.Setup], st: stack.Stack,
              sources: list[loop.DataBatches]) -> loop.Objective:
  """``sft_objective`` for runs trained together (``jlora.run.group``): the stacked loss
  over each run's rows, and held-out metrics of any of the runs in one batch: the k-th
  held-out batch of every run asked in one forward (each adapter on its own rows), their
  greedy answers in one decode."""
  s0, n = setups[0], len(setups)
  rows = tuple(s.cfg.data.batch_size for s in setups)
  chunk = s0.cfg.train.loss_chunk
  held_out = [evaluate.eval_batches(s.cfg, s.tok) for s in setups]
  tasks = [evaluate.task_records(s.cfg) for s in setups]
  losses = {}  # one jitted loss per split of the rows

  def loss_for(sizes: tuple[int, ...]):
    if sizes not in losses:
      losses[sizes] = jax.jit(mesh_lib.traced_in(
          lm.stacked_lm_loss(s0.model, st, sizes, chunk), s0.mesh))
    return losses[sizes]

  def eval_loss(trainable, which) -> list[dict]:
    sums, counts = np.zeros(n), np.zeros(n)
    for k in range(max((len(held_out[j]) for j in which), default=0)):
      part = [j for j in which if k < len(held_out[j])]
      sizes = tuple(len(held_out[j][k]["inputs"]) if j in part else 0 for j in range(n))
      batch = {key: np.concatenate([held_out[j][k][key] for j in part])
               for key in held_out[part[0]][k]}
      total, count = loss_for(sizes)(trainable, s0.frozen,
                                     mesh_lib.global_batch(batch, s0.mesh))
      sums, counts = sums + np.asarray(total), counts + np.asarray(count)
    return [{"eval_loss": float(sums[j] / max(counts[j], 1.0))} if held_out[j] else {}
            for j in which]

  def held_out_metrics(trainable, which) -> list[dict]:
    out = eval_loss(trainable, which)
    asked = [j for j in which if tasks[j][1]]
    if asked:
      params = stack.with_adapters(optim.combine(trainable["full"], s0.frozen),
                                   trainable["lora"], st)
      runs = [(evaluate.eval_data_config(s.cfg), tasks[j][1], s.cfg.eval.max_new_tokens)
              if j in asked else None for j, s in enumerate(setups)]
      said = mesh_lib.traced_in(evaluate.group_answers, s0.mesh)(s0.model, params, s0.tok,
                                                                 runs)
      for i, j in enumerate(which):
        if j in asked:
          task, records = tasks[j]
          out[i]["accuracy"] = sum(task.check(text, r["answer"])
                                   for text, r in zip(said[j], records)) / len(records)
    return out

  batches = loop.GroupBatches(sources, s0.mesh)
  return loop.Objective(lm.stacked_lm_loss(s0.model, st, rows, chunk), batches,
                        held_out_metrics, eval_loss)


SFT = driver.register(driver.Kind(
    "sft", "train", "train from a TOML recipe (see configs/)", "configs/quickstart.toml",
    build.Rules(), sft_objective, group=group.Group(sft_batches, sft_group)))


def run(cfg: config_lib.RunConfig, **kwargs) -> dict:
  """``jlora train``: ``driver.run`` with the SFT objective (same keyword arguments)."""
  return driver.run(cfg, SFT, **kwargs)


def advise(cfg: config_lib.RunConfig, pre: build.Preflight | None = None):
  """``jlora advise`` of an SFT recipe (``driver.advise``)."""
  return driver.advise(cfg, SFT, pre)
