"""The language-model objective's pieces: log-probabilities of target tokens and the
token cross-entropy, computed in chunks of tokens so [B, T, V] logits never exist whole.
``lm_loss`` is supervised fine-tuning's loss (``jlora.objectives.sft``); RL's policy loss
takes ``token_logprobs`` (``jlora.objectives.rl.losses``). A batch is
``{"inputs", "targets": int [B, T], "mask": [B, T]}`` plus optional ``"segment_ids"`` /
``"positions"`` for packed rows.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora.core import matmul, optim, stack
from jlora.run.train_step import LossFn


def token_logprobs(model, params, batch, chunk: int | None = None, last: int | None = None
                   ) -> jax.Array:
  """[B, T] f32 log-probabilities of ``batch["targets"]`` under the model (every
  objective's per-token quantity: SFT's cross-entropy is their negation, RL weighs them by
  advantages). With ``last`` only the last ``last`` positions are unembedded and returned
  ([B, last]): RL scores only the completion, and the prompt's [P, vocab] logits are never
  computed.

  With ``chunk`` (and a model with ``hidden``/``logits`` methods, as jlora's are) the
  unembedding and log-softmax run over ``chunk`` tokens at a time under
  ``jax.checkpoint``: the ``[B, T, vocab]`` f32 logits are never held, forward or
  backward, only one ``[chunk, vocab]`` block at a time (what that saves:
  docs/ARCHITECTURE.md, "Chunked cross-entropy").
  """
  args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
  targets = batch["targets"]
  if (chunk is None and last is None) or not hasattr(model, "logits"):
    logits, _ = model.apply({"params": params}, *args)
    out = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return out if last is None else out[:, -last:]
  h, _ = model.apply({"params": params}, *args, method="hidden")
  if last is not None:
    h, targets = h[:, -last:], targets[:, -last:]
  return hidden_logprobs(model, params, h, targets, chunk)


def hidden_logprobs(model, params, h, targets, chunk: int | None = None) -> jax.Array:
  """[B, T] f32 log-probabilities of ``targets`` [B, T] given final hidden states ``h``
  [B, T, D] (``model.hidden``'s), unembedded over ``chunk`` tokens at a time under
  ``jax.checkpoint`` (``token_logprobs``), or at once when ``chunk`` is None."""
  if chunk is None:
    return _unembedded(model, params, h, targets)
  B, T = targets.shape
  n = B * T
  chunk = min(chunk, n)
  pad = -n % chunk
  h_c = jnp.pad(h.reshape(n, -1), ((0, pad), (0, 0))).reshape(-1, chunk, h.shape[-1])
  t_c = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)

  chunk_logprobs = jax.checkpoint(lambda params, h, t: _unembedded(model, params, h, t))
  _, logp = jax.lax.scan(lambda c, xs: (c, chunk_logprobs(params, *xs)), None, (h_c, t_c))
  return logp.reshape(-1)[:n].reshape(B, T)


def _unembedded(model, params, h, targets):
  """log p(targets) from hidden states: the model's own ``target_logprobs`` where it has
  one (jlora's: a quantised tied table is read a vocabulary block at a time), else its
  logits' log-softmax."""
  if hasattr(model, "target_logprobs"):
    return model.apply({"params": params}, h, targets, method="target_logprobs")
  logits = model.apply({"params": params}, h, method="logits")
  return -optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def completion_logprobs(model, params, batch, chunk: int | None = None) -> jax.Array:
  """Log-probabilities of sampled completions' tokens, shaped like ``batch["mask"]``, in
  either of RL's layouts (``layout.training_batch``):

  - per row (``mask`` [B, N]): each row a prompt and one completion; the completion's
    tokens are the last N targets (``token_logprobs(last=N)``);
  - grouped (``mask`` [G, S, N]): each of the G rows one prompt (width P) followed by its
    S completions' first N - 1 tokens each (``inputs`` [G, P + S (N - 1)], the prompt a
    shared prefix: negative segment ids), ``targets`` [G, S, N] the completions' tokens.
    Completion s's token k is read from the prompt's last position (k = 0) or from its
    own token k - 1: the same log-probability as the per-row layout, with each prompt's
    forward and backward done once for its group instead of S times.
  """
  mask = batch["mask"]
  N = mask.shape[-1]
  if mask.ndim == 2:
    return token_logprobs(model, params, batch, chunk, last=N)
  G, S = mask.shape[:2]
  h, _ = model.apply({"params": params}, batch["inputs"], batch["positions"],
                     batch["segment_ids"], method="hidden")
  P = h.shape[1] - S * (N - 1)
  k = np.arange(N)
  index = np.where(k[None, :] == 0, P - 1, P + np.arange(S)[:, None] * (N - 1) + k - 1)
  h = jnp.take(h, index.reshape(-1), axis=1).reshape(G * S, N, h.shape[-1])
  return hidden_logprobs(model, params, h, batch["targets"].reshape(G * S, N),
                         chunk).reshape(G, S, N)


def token_loss_sum(model, params, batch, chunk: int | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token cross-entropies in f32, number of masked-in tokens); chunked as
  ``token_logprobs``."""
  mask = batch["mask"].astype(jnp.float32)
  return -jnp.sum(token_logprobs(model, params, batch, chunk) * mask), jnp.sum(mask)


def lm_loss(model, spec, loss_chunk: int | None = None) -> LossFn:
  """The supervised objective: ``loss(trainable, frozen, batch) -> (token cross-entropy
  sum, masked-in token count)`` over the model with its adapters (``token_loss_sum``)."""
  def loss(trainable, frozen, batch):
    return token_loss_sum(model, optim.model_params(trainable, frozen, spec), batch,
                          loss_chunk)
  return loss


def spread(i, n: int, total, count, *aux) -> tuple:
  """One adapter's (total, count[, aux]) as ``[n]`` vectors holding them at index ``i``
  (``_min`` / ``_max`` aux: +-inf elsewhere, so the step's min / max leave the other
  adapters' alone): what a stacked loss (``make_step(adapter_axes=...)``) returns for a
  micro-batch of adapter i's rows."""
  one = jax.nn.one_hot(i, n, dtype=jnp.float32)

  def spread_aux(k, v):
    if k.endswith(("_min", "_max")):
      return jnp.where(one > 0, v, jnp.inf if k.endswith("_min") else -jnp.inf)
    return one * v
  return (one * total, one * count) + tuple({k: spread_aux(k, v) for k, v in a.items()}
                                            for a in aux)


def one_adapter(fn: Callable, st) -> LossFn:
  """A stacked loss (``make_step(adapter_axes=...)``) for batches of one adapter's rows
  (``"adapter"``: its index on every row; ``group.GroupBatches``' micro-batches):
  ``fn(params, batch) -> (total, count[, aux])`` runs the batch through that adapter alone
  (``stack.with_adapter``, the plain LoRA path), and its results come back ``spread``."""
  def loss(trainable, frozen, batch):
    i = batch["adapter"][0]
    params = stack.with_adapter(optim.combine(trainable["full"], frozen), trainable["lora"],
                                st, i)
    return spread(i, st.n, *fn(params, batch))
  return loss


def stacked_lm_loss(model, st, rows: tuple[int, ...], loss_chunk: int | None = None) -> LossFn:
  """``lm_loss`` for stacked adapters (``jlora.core.stack``): a step's batch holds
  ``rows[i]`` rows for adapter i, grouped in adapter order (a micro-batch of it the same
  shares); returns each adapter's token cross-entropy sum and masked-in token count, ``[N]``
  each (``make_step`` with ``adapter_axes`` divides each adapter by its own count).

  A batch with ``"adapter"`` (int [B]) holds one adapter's rows only, that adapter's id on
  every row: the micro-batches of a step whose runs have equal rows, laid out so that each
  is one run's (``group.GroupBatches(micro=...)``). Each then runs adapter i alone through
  the plain LoRA path (``stack.with_adapter``): a solo run's batch and work, one
  micro-batch's activations at a time."""
  micro = one_adapter(lambda params, batch: token_loss_sum(model, params, batch, loss_chunk),
                      st)

  def loss(trainable, frozen, batch):
    if "adapter" in batch:
      return micro(trainable, frozen, batch)
    B = batch["mask"].shape[0]
    if any((B * r) % sum(rows) for r in rows):
      raise ValueError(f"a batch of {B} rows does not split as {rows}")
    sizes = tuple(B * r // sum(rows) for r in rows)
    params = stack.with_adapters(optim.combine(trainable["full"], frozen),
                                 trainable["lora"], st)
    with matmul.adapter_rows(sizes):
      logp = token_logprobs(model, params, batch, loss_chunk)
    mask = batch["mask"].astype(jnp.float32)
    per_row = (-jnp.sum(logp * mask, axis=1), jnp.sum(mask, axis=1))
    ends = np.cumsum(sizes)
    return tuple(jnp.stack([jnp.sum(x[e - n:e]) for n, e in zip(sizes, ends)])
                 for x in per_row)
  return loss
