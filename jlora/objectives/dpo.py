"""``jlora dpo``: preference tuning on ``{prompt, chosen, rejected}`` pairs, on the shared
run loop (checkpoints, resume, signals, metrics and export are SFT's).

The losses (``[dpo] loss``), each a mean over pairs. With pc / pr the policy's summed
log-probs of the chosen / rejected completion's tokens, rc / rr the reference's, lc / lr
their token counts, and h = (pc - rc) - (pr - rr):

- ``sigmoid`` (DPO; Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log sigma(beta h).
- ``ipo`` (IPO; Azar et al. 2023, arXiv:2310.12036, eq. 17 with tau = beta): (h - 1/(2 beta))^2,
  on summed log-probs as in the paper (TRL divides by length first).
- ``hinge`` (SLiC; Zhao et al. 2023, arXiv:2305.10425): max(0, 1 - beta h).
- ``simpo`` (SimPO; Meng et al. 2024, arXiv:2405.14734, eq. 6), reference-free on
  length-normalised log-probs with a target margin gamma:
  -log sigma(beta (pc/lc - pr/lr) - gamma).
- ``orpo`` (ORPO; Hong et al. 2024, arXiv:2403.07691, eq. 6-7), reference-free: the chosen
  completion's token-mean NLL plus lambda x -log sigma(log odds(c) - log odds(r)), where
  log odds(y) = a - log(1 - exp(a)) and a = the token-mean log-prob (pc/lc or pr/lr).

The reference (``sigmoid``, ``ipo``, ``hinge``) is the policy before training, frozen: the
base with adapters off, which under LoRA *is* the frozen base the step already holds (no
copy); with ``lora.init`` (starting from an SFT adapter) the base plus a copy of that
starting adapter (TRL's ``ref_adapter_name``; the adapter is megabytes, the base is not
copied); leaves trained in full (``lora.full``, full fine-tuning) keep a copy of their
initial values, the one case that costs memory (as RL's KL). Its log-probs are computed
in the same step, a forward pass without gradient (``bench/dpo.py`` measured that against
computing them per batch in a separate program: see bench/RESULTS.md); a batch that
brings its own ``ref_logps`` (precomputed) skips it.

Batch fields (``jlora.data.pairs``): ``inputs`` / ``targets`` / ``mask`` int [2P, T], the
first half of the rows the pairs' prompt + chosen completion, the second half the same
pairs' prompt + rejected completion (``mask`` on the completion's tokens only); optional
``ref_logps`` f32 [2P] (the reference's summed log-probs of each row's completion). A pair
whose chosen row has no masked-in token is padding (weight 0).

Metrics under TRL's names (means over pairs): ``rewards/chosen`` = beta (pc - rc),
``rewards/rejected`` = beta (pr - rr) (reference-free losses: beta pc/lc and beta pr/lr for
simpo, lambda of those for orpo, as TRL's CPO and ORPO trainers), ``rewards/margins``,
``rewards/accuracies`` (chosen reward > rejected), ``logps/chosen`` / ``logps/rejected``
(the policy's summed log-probs); the step's ``tokens`` column counts the loss's pairs.
Held out: ``eval_loss``, ``preference_accuracy`` (the held-out pairs'
``rewards/accuracies``), ``eval_rewards/margins`` and, for tasks that check answers, greedy
``accuracy`` as SFT's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jlora import data
from jlora.core import optim, stack
from jlora.data import pairs
from jlora.findings import advisor, hparams
from jlora.infra import mesh as mesh_lib
from jlora.objectives import lm
from jlora.run import build, config as config_lib, driver, evaluate, group, plug
from jlora.run import train_step

LOSSES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
FIELDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected", "preference_accuracy", "eval_rewards/margins")


@dataclasses.dataclass(frozen=True)
class DPOSection:
  """``jlora dpo``: preference tuning (jlora.objectives.dpo). ``data.batch_size`` counts
  pairs (a step's batch has twice as many rows); records are ``{prompt, chosen,
  rejected}``."""
  beta: float = 0.1  # the reward's scale (DPO's beta; SimPO's paper uses 2.0-2.5)
  loss: str = "sigmoid"  # or ipo, hinge (reference: the start), simpo, orpo (reference-free)
  gamma: float = 0.5  # simpo: the target margin (TRL's simpo_gamma)
  orpo_lambda: float = 0.1  # orpo: the odds-ratio term's weight (`lambda` is Python's)

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"dpo.loss {self.loss!r} is not one of {', '.join(LOSSES)}")
    if not (math.isfinite(self.beta) and self.beta > 0):
      raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
    for name in ("gamma", "orpo_lambda"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
        raise ValueError(f"dpo.{name} must be >= 0, got {getattr(self, name)}")


# Pairs are not packed: each row's positions are its own (``jlora.data.pairs``).
SECTION = config_lib.Section("dpo", DPOSection, {"data": {"pack": False}})


def sequence_logps(model, params, batch, chunk: int | None = None):
  """(summed log-prob of each row's masked-in tokens [R], their count [R]), f32."""
  mask = batch["mask"].astype(jnp.float32)
  logp = lm.token_logprobs(model, params, batch, chunk)
  return jnp.sum(logp * mask, axis=1), jnp.sum(mask, axis=1)


def pair_losses(kind: str, pc, pr, lc, lr, rc=None, rr=None, *, beta: float = 0.1,
                gamma: float = 0.5, orpo_lambda: float = 0.1):
  """Per pair: (loss, chosen reward, rejected reward) of loss ``kind`` (module docstring)
  from the policy's summed log-probs ``pc`` / ``pr``, token counts ``lc`` / ``lr`` and the
  reference's ``rc`` / ``rr`` (unused by the reference-free kinds)."""
  if kind in REFERENCE_FREE:
    ac, ar = pc / jnp.maximum(lc, 1.0), pr / jnp.maximum(lr, 1.0)
    if kind == "simpo":
      return -jax.nn.log_sigmoid(beta * (ac - ar) - gamma), beta * ac, beta * ar
    # log odds(y) = a - log(1 - e^a); a < 0 for any completion with a token
    odds = lambda a: a - jnp.log1p(-jnp.exp(jnp.minimum(a, -1e-6)))  # noqa: E731
    ratio = -jax.nn.log_sigmoid(odds(ac) - odds(ar))
    return -ac + orpo_lambda * ratio, orpo_lambda * ac, orpo_lambda * ar
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)
  h = (pc - rc) - (pr - rr)
  if kind == "sigmoid":
    return -jax.nn.log_sigmoid(beta * h), chosen, rejected
  if kind == "ipo":
    return (h - 1.0 / (2.0 * beta)) ** 2, chosen, rejected
  if kind == "hinge":
    return jax.nn.relu(1.0 - beta * h), chosen, rejected
  raise ValueError(f"unknown preference loss {kind!r}; use one of {', '.join(LOSSES)}")


def _terms(model, kind: str, beta: float, gamma: float, orpo_lambda: float,
           chunk: int | None):
  """(policy params, reference params, batch) -> (loss sum, pairs, aux sums)."""
  if kind not in LOSSES:
    raise ValueError(f"unknown preference loss {kind!r}; use one of {', '.join(LOSSES)}")

  def terms(policy, reference, batch):
    sums, counts = sequence_logps(model, policy, batch, chunk)
    P = sums.shape[0] // 2
    ref = (None, None)
    if kind not in REFERENCE_FREE:
      ref_sums = batch.get("ref_logps")
      if ref_sums is None:
        ref_sums, _ = sequence_logps(model, reference, batch, chunk)
      ref_sums = jax.lax.stop_gradient(ref_sums)
      ref = (ref_sums[:P], ref_sums[P:])
    loss, chosen, rejected = pair_losses(kind, sums[:P], sums[P:], counts[:P], counts[P:],
                                         *ref, beta=beta, gamma=gamma,
                                         orpo_lambda=orpo_lambda)
    pair = (counts[:P] > 0).astype(jnp.float32)  # padding pairs weigh 0
    total = lambda x: jnp.sum(x * pair)  # noqa: E731
    aux = {"rewards/chosen": total(chosen), "rewards/rejected": total(rejected),
           "rewards/margins": total(chosen - rejected),
           "rewards/accuracies": total((chosen > rejected).astype(jnp.float32)),
           "logps/chosen": total(sums[:P]), "logps/rejected": total(sums[P:])}
    return total(loss), jnp.sum(pair), aux

  return terms


def _section_kwargs(cfg: config_lib.RunConfig) -> dict:
  d = cfg.dpo
  return {"kind": d.loss, "beta": d.beta, "gamma": d.gamma, "orpo_lambda": d.orpo_lambda,
          "chunk": cfg.train.loss_chunk}


def dpo_loss(model, plan, *, kind: str = "sigmoid", beta: float = 0.1, gamma: float = 0.5,
             orpo_lambda: float = 0.1, chunk: int | None = None) -> train_step.LossFn:
  """``loss(trainable, frozen, batch) -> (loss sum, pairs, aux sums)`` for
  ``train_step.make_step`` (the batch: module docstring). ``frozen`` is
  ``{"base": the frozen base, "ref": {"lora", "full"}}``: the reference is
  ``optim.model_params(frozen["ref"], base, plan)``, the base itself when ``ref`` holds
  nothing (``reference``)."""
  terms = _terms(model, kind, beta, gamma, orpo_lambda, chunk)

  def loss(trainable, frozen, batch):
    base, ref = frozen["base"], frozen["ref"]
    return terms(optim.model_params(trainable, base, plan),
                 optim.model_params(ref, base, plan), batch)
  return loss


def stacked_dpo_loss(model, st, **kwargs) -> train_step.LossFn:
  """``dpo_loss`` of stacked adapters (runs trained together) over micro-batches of one
  run's pairs each (``"adapter"``, ``lm.spread``); ``frozen["ref"]["lora"]`` the runs'
  starting adapters stacked (empty: every run's reference is the base)."""
  terms = _terms(model, **kwargs)

  def loss(trainable, frozen, batch):
    i = batch["adapter"][0]
    base, ref = frozen["base"], frozen["ref"]["lora"]
    policy = stack.with_adapter(optim.combine(trainable["full"], base), trainable["lora"],
                                st, i)
    reference = stack.with_adapter(base, ref, st, i) if ref else base
    return lm.spread(i, st.n, *terms(policy, reference, batch))
  return loss


def reference(s: build.Setup) -> dict:
  """The reference's part of the loss's ``frozen`` (``dpo_loss``): copies of the trainable
  state's starting values that differ from the base: a ``lora.init`` adapter's factors and
  leaves trained in full. A fresh LoRA run's is empty: its reference is the base itself."""
  if s.cfg.dpo.loss in REFERENCE_FREE:
    return {"lora": {}, "full": {}}
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731
  return {"lora": copy(s.trainable["lora"]) if _starts_trained(s.cfg) else {},
          "full": copy(s.trainable["full"])}


def _starts_trained(cfg: config_lib.RunConfig) -> bool:
  """Whether the reference holds a starting adapter: ``lora.init``, for a loss with a
  reference."""
  return (cfg.lora.init is not None and cfg.train.method == "lora"
          and cfg.dpo.loss not in REFERENCE_FREE)


class PairBatches(plug.DataBatches):
  """A run's preference batches (``jlora.data.pairs``) on its mesh. In a group it also
  keeps the run's starting adapter (``start``: a copy, taken before the step owns the
  run's state) and whether it came from ``lora.init``, for the group's reference."""

  def __init__(self, cfg: data.DataConfig, tok, mesh, blocks: int = 1, start=None,
               initialised: bool = False):
    super().__init__(iter(pairs.dataset(cfg, tok, blocks=blocks)), mesh)
    self.start, self.initialised = start, initialised


def held_out_batches(cfg: config_lib.RunConfig, tok) -> list[dict]:
  """The first ``eval.batches`` batches of held-out pairs (host rows), the last one
  completed with pairs of weight 0."""
  dcfg = evaluate.eval_data_config(cfg)
  if dcfg is None or cfg.eval.batches == 0:
    return []
  it = pairs.dataset(dcfg, tok, drop_remainder=False)
  return [b for _, b in zip(range(cfg.eval.batches), it)]


def _means(sums: list, keys: dict) -> dict:
  """Held-out metrics from per-batch (loss sum, pairs, aux sums)."""
  n = max(sum(float(c) for _, c, _ in sums), 1.0)
  return {name: sum(float(a[key]) for _, _, a in sums) / n if key else
          sum(float(x) for x, _, _ in sums) / n for name, key in keys.items()}


HELD_OUT = {"eval_loss": None, "preference_accuracy": "rewards/accuracies",
            "eval_rewards/margins": "rewards/margins"}


def objective(s: build.Setup) -> plug.Objective:
  """The preference objective for the shared loop (see the module docstring)."""
  cfg = s.cfg
  loss = dpo_loss(s.model, s.plan, **_section_kwargs(cfg))
  frozen = {"base": s.frozen, "ref": reference(s)}
  loss_fn = jax.jit(mesh_lib.traced_in(loss, s.mesh))
  held = [mesh_lib.global_batch(b, s.mesh) for b in held_out_batches(cfg, s.tok)]

  def eval_loss(trainable) -> dict:
    return _means([loss_fn(trainable, frozen, b) for b in held], HELD_OUT) if held else {}

  return plug.Objective(loss, PairBatches(cfg.data, s.tok, s.mesh),
                        evaluate.with_accuracy(s, eval_loss), eval_loss, FIELDS, frozen=frozen)


def dpo_batches(s: build.Setup) -> PairBatches:
  """A run's own pairs in a group: blocks of the group's contiguous micro-batches; its
  starting adapter kept for the group's reference (``dpo_group``)."""
  start = jax.tree_util.tree_map(jnp.copy, s.trainable["lora"])
  return PairBatches(s.cfg.data, s.tok, s.mesh, blocks=s.cfg.train.grad_accum, start=start,
                     initialised=_starts_trained(s.cfg))


def dpo_group(setups: list[build.Setup], st: stack.Stack, sources: list[PairBatches],
              micro: int) -> plug.Objective:
  """``objective`` for runs trained together (``jlora dpo A.toml B.toml``): the stacked
  loss over micro-batches of one run each; held out, each run's loss and preference
  accuracy on its own pairs, and greedy answers in shared decodes
  (``evaluate.group_accuracy``)."""
  s0 = setups[0]
  loss = stacked_dpo_loss(s0.model, st, **_section_kwargs(s0.cfg))

  # every run's reference is the base, or (a run from lora.init in the group) each run's
  # starting adapter stacked: a fresh run's (B = 0) leaves the base exactly
  ref = stack.stack_adapters([b.start for b in sources], st) \
      if any(b.initialised for b in sources) else {}
  frozen = {"base": s0.frozen, "ref": {"lora": ref, "full": {}}}
  loss_fn = jax.jit(mesh_lib.traced_in(loss, s0.mesh))
  held = evaluate.tagged([held_out_batches(s.cfg, s.tok) for s in setups], s0.mesh)

  def eval_loss(trainable, which) -> list[dict]:
    return [_means([jax.tree_util.tree_map(lambda x: x[j], loss_fn(trainable, frozen, b))
                    for b in held[j]], HELD_OUT) if held[j] else {} for j in which]

  return plug.Objective(loss, group.GroupBatches(sources, s0.mesh, micro),
                        evaluate.with_group_accuracy(setups, st, eval_loss), eval_loss, FIELDS,
                        frozen=frozen)


def _rows(cfg: config_lib.RunConfig) -> tuple[int, str]:
  return 2 * cfg.data.batch_size, f"2 x data.batch_size = {2 * cfg.data.batch_size} rows"


def check_data(cfg: config_lib.RunConfig, tok, model_cfg, limit: int) -> data.Stats:
  """The pairs' checks (up to ``limit`` records, evenly spaced; all when fewer): every
  record has a prompt, chosen and rejected that render, each completion fits
  ``data.seq_len`` (prompts may be cut from the left); pairs split evenly over
  ``train.grad_accum``; a held-out source opens. Returns statistics for the advisor
  (information: at most 1 bit a pair, which completion is preferred)."""
  d = cfg.data
  if d.batch_size % cfg.train.grad_accum:
    raise ValueError(f"data.batch_size={d.batch_size} pairs do not split into "
                     f"train.grad_accum={cfg.train.grad_accum} micro-batches")
  stats = pairs.stats(d, tok, limit=limit)
  eval_cfg = evaluate.eval_data_config(cfg)
  if eval_cfg is not None and (cfg.eval.batches or cfg.eval.examples):
    data.open_source(eval_cfg)
  return stats


DPO = driver.register(driver.Kind(
    "dpo", "dpo", "preference tuning (DPO, IPO, hinge, SimPO, ORPO) on {prompt, chosen, "
    "rejected} pairs from a TOML recipe with a [dpo] section", "configs/dpo_arithmetic.toml",
    build.Rules(_rows, check_data, hparams.PREFERENCE_LR_FACTOR), objective, SECTION,
    advisor.advise_preference,
    group=group.Group(dpo_batches, dpo_group, ("dpo", "data.batch_size"))))


def run(cfg: config_lib.RunConfig, **kwargs) -> dict:
  """``jlora dpo``: ``driver.run`` with the preference objective (same keyword arguments)."""
  return driver.run(cfg, DPO, **kwargs)
