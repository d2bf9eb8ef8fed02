"""``jlora rl``: policy-gradient RL with LoRA on checkable rewards, on the shared run loop.

The pieces: ``rollouts.Rollouts`` (the batch source: sample prompts x group completions
from the current policy, score them with ``rewards``, centre the rewards per group),
``losses.policy_loss`` (importance-sampling or PPO loss, optional KL to the base), and
``objective`` tying them into a ``plug.Objective``, and ``check_data`` (what RL checks before
anything is loaded): ``RL`` declares them to the shared run (``driver.run``), so
checkpoints, resume, metrics, signals and export are SFT's. Defaults from the
findings (FINDINGS 6): rank 1 (``section.SECTION``), alpha 32, a tenth of the LR rule's LR,
constant schedule, no KL. The ``[rl]`` settings are ``section.RLSection``.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np

from jlora import data, models
from jlora.core import optim, stack
from jlora.data import render
from jlora.findings import advisor, hparams
from jlora.run import build, config as config_lib, driver, evaluate, group, plug
from jlora.objectives.rl import losses, rewards, rollouts, section
from jlora.objectives.rl.rollouts import Rollouts
from jlora.objectives.rl.section import RLSection

__all__ = ["losses", "rewards", "section", "Rollouts", "RLSection", "objective", "run",
           "FIELDS", "RL"]

FIELDS = ("reward_mean", "reward_std", "correct", "ratio_mean", "ratio_min", "ratio_max",
          "clip_frac", "kl", "completion_tokens", "constant_groups", "sampled_tokens_per_s",
          "sample_s", "eval_reward")


def reference(s: build.Setup) -> Callable | None:
  """trainable -> the reference policy's parameters: the base with adapters off. Under
  LoRA that is the frozen base itself (no copy); leaves trained in full (full fine-tuning,
  ``lora.full``) keep a copy of their initial values: the one case that costs memory."""
  if not s.cfg.rl.kl_coef and not s.cfg.rl.track_kl:
    return None
  full = s.trainable["full"]
  initial = jax.tree_util.tree_map(lambda x: x.copy(), full) if full else {}
  return lambda trainable: optim.combine(initial, s.frozen)


def _padded(records: list[dict], shards: int) -> list[dict]:
  return records + records[-1:] * (-len(records) % shards)


def held_out(s: build.Setup, rollouts: Rollouts) -> Callable[[dict], dict]:
  """trainable -> greedy (temperature 0) held-out metrics: ``accuracy`` (final answers
  parsed as the reward parses them) and ``eval_reward`` (mean reward), on the first
  ``eval.examples`` records of the held-out split."""
  dcfg = evaluate.eval_data_config(s.cfg)
  if dcfg is None or s.cfg.eval.examples == 0:
    return lambda trainable: {}
  source = data.open_source(dcfg)
  records = [dict(source[i], _index=i) for i in range(min(s.cfg.eval.examples, len(source)))]
  shards = s.mesh.shape["data"] * s.mesh.shape["fsdp"]

  def metrics(trainable) -> dict:
    ep = rollouts.sample(trainable, _padded(records, shards), 1, jax.random.PRNGKey(0), 0.0)
    n = len(records)
    ep.records, ep.texts = ep.records[:n], ep.texts[:n]
    out = {"eval_reward": float(np.mean(rollouts.score(ep)))}
    if "answer" in records[0]:
      out["accuracy"] = float(np.mean([rewards.correct(t, r["answer"])
                                       for t, r in zip(ep.texts, ep.records)]))
    return out

  return metrics


def loss_settings(cfg: config_lib.RunConfig) -> dict:
  """``losses.policy_loss``'s keywords from a run's ``[rl]``."""
  rl = cfg.rl
  return {"kind": rl.loss, "clip": rl.clip, "kl_coef": rl.kl_coef,
          "chunk": cfg.train.loss_chunk, "clip_low": rl.clip_low, "clip_high": rl.clip_high,
          "gspo_clip": (rl.gspo_clip_low, rl.gspo_clip_high)}


def objective(s: build.Setup) -> plug.Objective:
  """The RL objective for the shared loop (see the module docstring)."""
  loss = losses.policy_loss(s.model, s.plan, **loss_settings(s.cfg))
  rollouts = Rollouts(s, data.open_source(s.cfg.data), reference(s))
  evaluate_fn = held_out(s, rollouts)
  return plug.Objective(loss, rollouts, evaluate_fn, evaluate_fn, FIELDS)


def check_data(cfg: config_lib.RunConfig, tok, model_cfg, limit: int) -> str:
  """RL's data checks: the prompts' source opens and has prompts (and answers, for the
  built-in reward); the reward function imports; prompts (up to ``limit`` of them, evenly
  spaced) plus ``rl.max_new_tokens`` fit the model's positions. Returns a line describing
  the data."""
  rewards.load(cfg.rl.reward)
  source = data.open_source(cfg.data)
  first = source[0]
  field = cfg.data.fields.prompt
  if field not in first:
    raise ValueError(f"data.source {cfg.data.source!r}: records have no {field!r} field "
                     f"(RL needs prompts; fields: {', '.join(sorted(first))})")
  if cfg.rl.reward == "answer" and "answer" not in first:
    raise ValueError(f"data.source {cfg.data.source!r}: records have no 'answer' for "
                     "rl.reward = 'answer' (give one, or a module:function reward)")
  d, rl = cfg.data, cfg.rl
  spaced = np.unique(np.linspace(0, len(source) - 1, limit, dtype=int))
  records = [source[int(i)] for i in spaced]
  eval_cfg = evaluate.eval_data_config(cfg)
  if eval_cfg is not None and cfg.eval.examples:
    held_out_source = data.open_source(eval_cfg)
    records += [held_out_source[i] for i in range(min(cfg.eval.examples,
                                                      len(held_out_source)))]
  longest = max(len(render.prompt_ids(r, tok, d.fields, d.chat, d.system)) for r in records)
  width = models.bucket(longest, rl.bucket)
  if width + rl.max_new_tokens > model_cfg.max_position_embeddings:
    raise ValueError(f"prompts of up to {width} tokens (padded to rl.bucket) + "
                     f"rl.max_new_tokens={rl.max_new_tokens} exceed the model's "
                     f"{model_cfg.max_position_embeddings} positions")
  return f"{len(source)} prompts from {cfg.data.source}"


def _rows(cfg: config_lib.RunConfig) -> tuple[int, str]:
  return cfg.rl.rows, f"rl.prompts_per_step x rl.group_size = {cfg.rl.rows}"


def _advise(cfg: config_lib.RunConfig, model_cfg, stats, plan) -> list:
  # distinct rewards: right/wrong, times with/without the format bonus
  bits = math.log2(4) if cfg.rl.format_reward and cfg.rl.reward == "answer" else 1.0
  return advisor.advise_rl(cfg, model_cfg, plan, cfg.rl.rows, bits)


def rl_batches(s: build.Setup) -> Rollouts:
  """A run's own rollouts (its prompts' order, its sampling key, its reward) in a group."""
  return Rollouts(s, data.open_source(s.cfg.data), reference(s))


def rl_group(setups: list[build.Setup], st: stack.Stack, runs: list[Rollouts], micro: int
             ) -> plug.Objective:
  """``objective`` for RL runs trained together (``jlora rl A.toml B.toml``): every run's
  step sampled in one decode (``rollouts.GroupRollouts``), the stacked policy loss over
  micro-batches of one run each (``losses.stacked_policy_loss``); held out, each run's
  greedy answers through its own adapter (its solo ``held_out``)."""
  s0 = setups[0]
  loss = losses.stacked_policy_loss(s0.model, st, **loss_settings(s0.cfg))
  held = [held_out(s, run) for s, run in zip(setups, runs)]

  def evaluate_fn(trainable, which) -> list[dict]:
    return [held[j]({"lora": stack.unstack(trainable["lora"], st, j), "full": {}})
            for j in which]

  return plug.Objective(loss, rollouts.GroupRollouts(runs, st, micro), evaluate_fn,
                        evaluate_fn, FIELDS)


# What RL runs trained together share besides group.SHARED: one decode samples every run
# (its length, temperature, nucleus) and one loss trains them (its kind, clip, KL).
RL_SHARED = ("rl.max_new_tokens", "rl.temperature", "rl.top_p", "rl.loss", "rl.clip",
             "rl.clip_low", "rl.clip_high", "rl.gspo_clip_low", "rl.gspo_clip_high",
             "rl.kl_coef", "rl.track_kl", "rl.updates_per_batch")

# A step's rows are prompts x group; the LR rule's absolute values are fit on SFT and
# measured too high for RL (hparams.RL_LR_FACTOR).
RL = driver.register(driver.Kind(
    "rl", "rl", "policy-gradient RL on rewards from a TOML recipe with an [rl] section "
    "(rank 1 by default)", "configs/rl_arithmetic.toml",
    build.Rules(_rows, check_data, hparams.RL_LR_FACTOR), objective, section.SECTION,
    _advise, group=group.Group(rl_batches, rl_group, RL_SHARED, lambda cfg: cfg.rl.rows)))


def load_config(path: str, overrides=()) -> config_lib.RunConfig:
  """A recipe read for ``jlora rl`` (``driver.load``): an ``[rl]`` section and RL's
  defaults under the recipe's own values."""
  return driver.load(path, overrides, RL)


def run(cfg: config_lib.RunConfig, **kwargs) -> dict:
  """``jlora rl``: ``driver.run`` with the RL objective (same keyword arguments)."""
  return driver.run(cfg, RL, **kwargs)


def advise(cfg: config_lib.RunConfig, pre: build.Preflight | None = None):
  """``jlora advise`` of an RL recipe (``driver.advise``)."""
  return driver.advise(cfg, RL, pre)
