"""Supervised fine-tuning (``jlora train``) as an objective of the shared run loop: token
cross-entropy over the data's masked-in tokens (``lm.lm_loss``), batches from the data
pipeline, held-out loss and (for tasks that can check answers) greedy accuracy.
"""

from __future__ import annotations

import jax

from jlora import data
from jlora.core import optim
from jlora.infra import mesh as mesh_lib
from jlora.objectives import lm
from jlora.run import build, config as config_lib, driver, evaluate, loop


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

  batches = loop.DataBatches(iter(data.dataset(cfg.data, s.tok)), s.mesh)
  return loop.Objective(loss, batches, held_out_metrics, eval_loss)


SFT = driver.register(driver.Kind(
    "sft", "train", "train from a TOML recipe (see configs/)", "configs/quickstart.toml",
    build.Rules(), sft_objective))


def run(cfg: config_lib.RunConfig, **kwargs) -> dict:
  """``jlora train``: ``driver.run`` with the SFT objective (same keyword arguments)."""
  return driver.run(cfg, SFT, **kwargs)


def advise(cfg: config_lib.RunConfig, pre: build.Preflight | None = None):
  """``jlora advise`` of an SFT recipe (``driver.advise``)."""
  return driver.advise(cfg, SFT, pre)
