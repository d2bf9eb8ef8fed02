"""Policy-gradient objectives over sampled completions, as ``train_step.make_step`` losses.

A batch holds ``prompts x group`` rows, each a left-padded prompt followed by its sampled
completion (``rollouts.training_batch`` builds it): ``inputs``/``targets``/``positions``/
``segment_ids`` [B, T] as for SFT; over the completion, the last N targets: ``mask`` [B, N]
on its tokens (through EOS), ``sampler_logprobs`` [B, N] (the sampling policy's log-prob of
each token, recorded when it was sampled, held fixed) and, when tracked, ``ref_logprobs``
(the reference policy: the base with adapters off); ``advantages`` [B]. Only those N
positions are unembedded (``lm.token_logprobs(last=N)``).

Token normalisation: the loss is the sum over every completion token in the batch divided
by the number of those tokens (one mean over the batch's tokens, as DAPO and Dr. GRPO
argue), not a per-sequence mean first. A per-sequence mean gives each token of a short
completion more weight than one of a long completion, which biases the update by length
(towards longer wrong answers and shorter right ones); a plain token sum ties the update's
size, and so the learning rate, to prompts x group x length. Dividing once by the token
count keeps every token equal and the LR rule's LR meaningful whatever the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import optim
from jlora.objectives import lm
from jlora.run import train_step

LOSSES = ("importance_sampling", "ppo")


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
  unclipped, clipped = ratio * adv, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * adv
  return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def kl_k3(logp, ref_logp):
  """Per-token KL(policy || reference) estimate on the policy's own samples (Schulman's
  k3: exp(d) - d - 1 with d = ref - policy; unbiased, >= 0, 0 where they agree)."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def policy_loss(model, plan, *, kind: str = "importance_sampling", clip: float = 0.2,
                kl_coef: float = 0.0, chunk: int | None = None) -> train_step.LossFn:
  """``loss(trainable, frozen, batch) -> (sum, tokens, aux)`` for ``train_step.make_step``.
  Aux (means over the completion tokens unless named _min/_max): ``ratio_mean``,
  ``ratio_min``, ``ratio_max``, ``clip_frac`` (ppo), ``kl`` (when the batch has
  ``ref_logprobs``)."""
  terms = _terms(model, kind, clip, kl_coef, chunk)
  return lambda trainable, frozen, batch: terms(
      optim.model_params(trainable, frozen, plan), batch)


def stacked_policy_loss(model, st, *, kind: str = "importance_sampling", clip: float = 0.2,
                        kl_coef: float = 0.0, chunk: int | None = None) -> train_step.LossFn:
  """``policy_loss`` of stacked adapters (``jlora.core.stack``: RL runs trained together)
  over micro-batches of one run's rows each (``"adapter"``): each through its own
  adapter, its sum, tokens and aux ``[N]`` (``lm.one_adapter``). The runs share ``kind``,
  ``clip`` and ``kl_coef`` (``RL_SHARED``)."""
  return lm.one_adapter(_terms(model, kind, clip, kl_coef, chunk), st)


def _terms(model, kind: str, clip: float, kl_coef: float, chunk: int | None):
  """(params, batch) -> (sum, tokens, aux) of the policy loss (``policy_loss``)."""
  if kind not in LOSSES:
    raise ValueError(f"unknown RL loss {kind!r}; use one of {', '.join(LOSSES)}")

  def terms_of(params, batch):
    mask = batch["mask"].astype(jnp.float32)
    logp = lm.token_logprobs(model, params, batch, chunk, last=mask.shape[1])
    on = mask > 0
    ratio = jnp.exp(logp - batch["sampler_logprobs"])
    terms, clipped = per_token(ratio, batch["advantages"][:, None], kind, clip)
    aux = {"ratio_mean": jnp.sum(ratio * mask),
           "ratio_min": jnp.min(jnp.where(on, ratio, jnp.inf)),
           "ratio_max": jnp.max(jnp.where(on, ratio, -jnp.inf))}
    if kind == "ppo":
      aux["clip_frac"] = jnp.sum(clipped * mask)
    if "ref_logprobs" in batch:
      kl = kl_k3(logp, batch["ref_logprobs"])
      aux["kl"] = jnp.sum(kl * mask)
      if kl_coef:
        terms = terms + kl_coef * kl
    elif kl_coef:
      raise ValueError("kl_coef > 0 needs ref_logprobs in the batch")
    return jnp.sum(terms * mask), jnp.sum(mask), aux

  return terms_of


def reference_logprobs(model, chunk: int | None = None, mesh=None):
  """A jitted ``(params, batch) -> [B, N]`` log-probs of the completion's targets (the
  batch's ``mask`` width): the reference policy's, given the reference's parameters (no
  gradient); rows split over the mesh's data axes like the batch they join."""
  from jlora.infra import mesh as mesh_lib
  mesh = mesh_lib.single_device_mesh() if mesh is None else mesh
  return jax.jit(mesh_lib.traced_in(lambda params, batch: lm.token_logprobs(
      model, params, batch, chunk, last=batch["mask"].shape[1]), mesh),
      out_shardings=mesh_lib.batch_sharding(mesh))
