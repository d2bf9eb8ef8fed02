"""Policy-gradient objectives over sampled completions, as ``train_step.make_step`` losses.

A batch holds ``prompts x group`` episodes (``layout.training_batch`` builds it), per row
(each row a left-padded prompt followed by its sampled completion: ``inputs``/``targets``/
``positions``/``segment_ids`` [B, T] as for SFT; over the completion, the last N targets:
``mask`` [B, N] on its tokens (through EOS), ``sampler_logprobs`` [B, N] (the sampling
policy's log-prob of each token, recorded when it was sampled, held fixed) and, when
tracked, ``ref_logprobs`` (the reference policy: the base with adapters off);
``advantages`` [B]) or grouped (each prompt once, its group's completions after it: the
per-token fields [prompts, group, N], ``advantages`` [prompts, group]; RL's default where
the shards allow, the same loss with each prompt's forward and backward done once). Only
the completions' positions are unembedded (``lm.completion_logprobs``).

Token normalisation: the loss is the sum over every completion token in the batch divided
by the number of those tokens (one mean over the batch's tokens, as DAPO and Dr. GRPO
argue), not a per-sequence mean first. A per-sequence mean gives each token of a short
completion more weight than one of a long completion, which biases the update by length
(towards longer wrong answers and shorter right ones); a plain token sum ties the update's
size, and so the learning rate, to prompts x group x length. Dividing once by the token
count keeps every token equal and the LR rule's LR meaningful whatever the batch.

The loss family (``kind``; ``sum / count`` is the loss; r = exp(log p - log p_sampler) per
token, A the row's advantage):

- ``importance_sampling``: -r A per token, token-level mean (above).
- ``ppo``: -min(r A, clip(r, 1 - clip, 1 + clip) A) per token, token-level mean.
- ``grpo`` (GRPO; Shao et al. 2024, arXiv:2402.03300, eq. 3): PPO's clipped term, per
  sequence the mean over its tokens, then the mean over sequences (``count``: sequences
  with a token). The length bias Dr. GRPO names comes from this per-sequence mean.
- ``dr_grpo`` (Dr. GRPO; Liu et al. 2025, arXiv:2503.20783, sec. 3.1): PPO's clipped term
  summed over tokens and divided by a constant, the batch's completion width (its mask
  columns: ``rl.max_new_tokens``) x rows; no std normalisation (``rl.normalize_std`` off).
- ``dapo`` (DAPO; Yu et al. 2025, arXiv:2503.14476, eq. 8-10): token-level mean of PPO's
  term with the asymmetric "clip-higher" range [1 - clip_low, 1 + clip_high], 0.2 / 0.28.
  DAPO's dynamic sampling is ``rl.drop_constant_groups`` (rows with no tokens here).
- ``gspo`` (GSPO; Zheng et al. 2025, arXiv:2507.18071, eq. 5-7): the sequence-level ratio
  s = exp(mean over the sequence's tokens of log r), -min(s A, clip(s, 1 - e_low,
  1 + e_high) A) per sequence with GSPO's own small range (3e-4 / 4e-4, the paper's), mean
  over sequences.
- ``cispo`` (CISPO; MiniMax-M1, arXiv:2506.13585, eq. 4): -sg(min(r, 1 + clip_high)) A
  log p per token (the IS weight clipped and stop-gradient: every token keeps a gradient),
  token-level mean.

``policy_loss`` never drops rows itself: a row's weight is its mask. Aux metrics are token
means whatever the normalisation (scaled to ``count`` for the step's division).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import optim
from jlora.objectives import lm
from jlora.run import train_step

LOSSES = ("importance_sampling", "ppo", "grpo", "dr_grpo", "dapo", "gspo", "cispo")
SEQUENCE_LEVEL = ("grpo", "gspo")  # count: sequences; the others count tokens
GSPO_CLIP = (3e-4, 4e-4)  # GSPO's sequence-ratio range (its paper's left / right)


def advantages(rewards, group_size: int, normalize_std: bool = False) -> np.ndarray:
  """Each reward minus its group's mean (rows ``g * group_size ...`` are one prompt's
  group); with ``normalize_std`` also divided by the group's std (GRPO; off by default, as
  in the cookbook and Dr. GRPO: it up-weights groups that are almost all equal)."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  a = r - r.mean(axis=1, keepdims=True)
  if normalize_std:
    a = a / (r.std(axis=1, keepdims=True) + 1e-6)
  return a.reshape(-1).astype(np.float32)


def constant_groups(rewards, group_size: int) -> np.ndarray:
  """[B] bool: rows whose group's rewards are all equal (their advantages are all 0)."""
  r = np.asarray(rewards).reshape(-1, group_size)
  return np.repeat(np.all(r == r[:, :1], axis=1), group_size)


def per_token(ratio, adv, kind: str, clip: float):
  """(per-token loss, clipped indicator). ``importance_sampling``: -ratio * A, whose
  gradient is -A * ratio * grad log p (on-policy: REINFORCE's -A grad log p); ``ppo``:
  -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)."""
  if kind == "importance_sampling":
    return -ratio * adv, jnp.zeros_like(ratio)
  if kind != "ppo":
    raise ValueError(f"unknown RL loss {kind!r}; use one of {', '.join(LOSSES)}")
  return clipped_surrogate(ratio, adv, clip, clip)


def clipped_surrogate(ratio, adv, low: float, high: float):
  """PPO's clipped surrogate with the range [1 - low, 1 + high]: (-min(ratio A,
  clip(ratio) A), where the clipped side is the minimum)."""
  unclipped, clipped = ratio * adv, jnp.clip(ratio, 1.0 - low, 1.0 + high) * adv
  return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def kl_k3(logp, ref_logp):
  """Per-token KL(policy || reference) estimate on the policy's own samples (Schulman's
  k3: exp(d) - d - 1 with d = ref - policy; unbiased, >= 0, 0 where they agree)."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def policy_loss(model, plan, *, kind: str = "importance_sampling", clip: float = 0.2,
                kl_coef: float = 0.0, chunk: int | None = None, clip_low: float = 0.2,
                clip_high: float = 0.28, gspo_clip: tuple[float, float] = GSPO_CLIP
                ) -> train_step.LossFn:
  """``loss(trainable, frozen, batch) -> (sum, count, aux)`` for ``train_step.make_step``
  (``kind``: the module docstring; ``clip``: ppo / grpo / dr_grpo's range, ``clip_low`` /
  ``clip_high``: dapo's, ``clip_high``: cispo's cap, ``gspo_clip``: gspo's). Aux (token
  means unless named _min/_max): ``ratio_mean``, ``ratio_min``, ``ratio_max``,
  ``clip_frac`` (clipped kinds; gspo: the sequences' fraction), ``kl`` (when the batch has
  ``ref_logprobs``)."""
  terms = _terms(model, kind, clip, kl_coef, chunk, clip_low, clip_high, gspo_clip)
  return lambda trainable, frozen, batch: terms(
      optim.model_params(trainable, frozen, plan), batch)


def stacked_policy_loss(model, st, *, kind: str = "importance_sampling", clip: float = 0.2,
                        kl_coef: float = 0.0, chunk: int | None = None, clip_low: float = 0.2,
                        clip_high: float = 0.28, gspo_clip: tuple[float, float] = GSPO_CLIP
                        ) -> train_step.LossFn:
  """``policy_loss`` of stacked adapters (``jlora.core.stack``: RL runs trained together)
  over micro-batches of one run's rows each (``"adapter"``): each through its own
  adapter, its sum, count and aux ``[N]`` (``lm.one_adapter``). The runs share the loss's
  settings (``RL_SHARED``)."""
  return lm.one_adapter(_terms(model, kind, clip, kl_coef, chunk, clip_low, clip_high,
                               gspo_clip), st)


def _terms(model, kind: str, clip: float, kl_coef: float, chunk: int | None,
           clip_low: float = 0.2, clip_high: float = 0.28,
           gspo_clip: tuple[float, float] = GSPO_CLIP):
  """(params, batch) -> (sum, count, aux) of the policy loss (``policy_loss``)."""
  if kind not in LOSSES:
    raise ValueError(f"unknown RL loss {kind!r}; use one of {', '.join(LOSSES)}")

  def terms_of(params, batch):
    N = batch["mask"].shape[-1]
    rows = lambda x: x.reshape(-1, N)  # noqa: E731  (the grouped layout's [G, S, N] too)
    mask = rows(batch["mask"]).astype(jnp.float32)
    logp = rows(lm.completion_logprobs(model, params, batch, chunk))
    log_ratio = logp - rows(batch["sampler_logprobs"])
    advantages = batch["advantages"].reshape(-1)
    kl = None
    if "ref_logprobs" in batch:
      kl = kl_k3(logp, rows(batch["ref_logprobs"]))
    elif kl_coef:
      raise ValueError("kl_coef > 0 needs ref_logprobs in the batch")
    penalty = kl_coef * kl if kl_coef else jnp.zeros_like(mask)
    if kind == "gspo":
      total, count, clipped = _gspo(log_ratio, advantages, penalty, mask, gspo_clip)
    else:
      per, clipped = _token_terms(kind, logp, jnp.exp(log_ratio), advantages[:, None],
                                  clip, clip_low, clip_high)
      total, count = _reduce(kind, per + penalty, mask)
      clipped = jnp.sum(clipped * mask)
    return total, count, _aux(kind, jnp.exp(log_ratio), kl, clipped, mask, count)

  return terms_of


def _token_terms(kind: str, logp, ratio, adv, clip: float, clip_low: float,
                 clip_high: float):
  """(per-token loss, clipped indicator) of a token-level kind (all but gspo)."""
  if kind in ("importance_sampling", "ppo"):
    return per_token(ratio, adv, kind, clip)
  if kind in ("grpo", "dr_grpo"):
    return clipped_surrogate(ratio, adv, clip, clip)
  if kind == "dapo":
    return clipped_surrogate(ratio, adv, clip_low, clip_high)
  weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + clip_high))  # cispo
  return -weight * adv * logp, (ratio > 1.0 + clip_high).astype(jnp.float32)


def _reduce(kind: str, per, mask):
  """(sum, count) of per-token losses by the kind's normalisation (module docstring)."""
  if kind == "grpo":  # each sequence's token mean, then over sequences
    tokens = jnp.sum(mask, axis=1)
    return (jnp.sum(jnp.sum(per * mask, axis=1) / jnp.maximum(tokens, 1.0)),
            jnp.sum((tokens > 0).astype(jnp.float32)))
  count = jnp.asarray(mask.size, jnp.float32) if kind == "dr_grpo" else jnp.sum(mask)
  return jnp.sum(per * mask), count


def _gspo(log_ratio, advantages, penalty, mask, bounds):
  """(sum, count, clipped sequences) of GSPO: the sequence ratio's clipped surrogate (and
  the KL penalty's token mean) per sequence, over the sequences with a token."""
  tokens = jnp.sum(mask, axis=1)
  has = (tokens > 0).astype(jnp.float32)
  mean = lambda x: jnp.sum(x * mask, axis=1) / jnp.maximum(tokens, 1.0)  # noqa: E731
  seq, clipped = clipped_surrogate(jnp.exp(mean(log_ratio)), advantages, *bounds)
  return jnp.sum((seq + mean(penalty)) * has), jnp.sum(has), jnp.sum(clipped * has)


def _aux(kind: str, ratio, kl, clipped, mask, count) -> dict:
  """The loss's aux metrics: token means (``ratio_mean``, ``clip_frac``, ``kl``; gspo's
  ``clip_frac`` a fraction of sequences), as sums the step divides by ``count``."""
  n = jnp.maximum(jnp.sum(mask), 1.0)
  counts_tokens = kind not in SEQUENCE_LEVEL and kind != "dr_grpo"
  as_sum = (lambda x: x) if counts_tokens else (lambda x: x / n * count)  # noqa: E731
  on = mask > 0
  aux = {"ratio_mean": as_sum(jnp.sum(ratio * mask)),
         "ratio_min": jnp.min(jnp.where(on, ratio, jnp.inf)),
         "ratio_max": jnp.max(jnp.where(on, ratio, -jnp.inf))}
  if kind != "importance_sampling":
    aux["clip_frac"] = clipped if kind == "gspo" else as_sum(clipped)
  if kl is not None:
    aux["kl"] = as_sum(jnp.sum(kl * mask))
  return aux


def reference_logprobs(model, chunk: int | None = None, mesh=None):
  """A jitted ``(params, batch) ->`` log-probs of the completion's targets, shaped like
  the batch's ``mask`` (``lm.completion_logprobs``, either layout): the reference policy's,
  given the reference's parameters (no gradient); rows split over the mesh's data axes
  like the batch they join."""
  from jlora.infra import mesh as mesh_lib
  mesh = mesh_lib.single_device_mesh() if mesh is None else mesh
  fn = mesh_lib.traced_in(lambda params, batch: lm.completion_logprobs(
      model, params, batch, chunk), mesh)
  jitted = {ndim: jax.jit(fn, out_shardings=mesh_lib.batch_sharding(mesh, ndim))
            for ndim in (2, 3)}
  return lambda params, batch: jitted[batch["mask"].ndim](params, batch)
