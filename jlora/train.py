"""The training step: one pure function, jitted once with explicit shardings.

``state = {"step", "trainable": {"lora", "full"}, "opt_state"}`` is donated; the frozen base
is a separate, never-donated argument. A batch is ``{"inputs", "targets": int [B, T],
"mask": [B, T]}`` plus optional ``"segment_ids"``/``"positions"`` for packed rows. The loss
is the token-mean cross-entropy over masked-in tokens; with gradient accumulation the
micro-batches' token-loss *sums* and counts are accumulated and divided once, so k
micro-batches give exactly the gradient of the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jlora import lora as lora_lib
from jlora import optim
from jlora import sharding as sharding_lib


def token_loss_sum(model, params, batch, chunk: int | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token cross-entropies in f32, number of masked-in tokens).

  With ``chunk`` (and a model with ``hidden``/``logits`` methods, as jlora's are) the
  unembedding and cross-entropy run over ``chunk`` tokens at a time under
  ``jax.checkpoint``: the ``[B, T, vocab]`` f32 logits are never held, forward or
  backward, only one ``[chunk, vocab]`` block at a time (for SmolLM2's 49k vocabulary at
  8 x 128 tokens that is 200 MB of logits, plus as much again for their gradient).
  """
  mask = batch["mask"].astype(jnp.float32)
  args = (batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
  if chunk is None or not hasattr(model, "logits"):
    logits, _ = model.apply({"params": params}, *args)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(xent * mask), jnp.sum(mask)
  h, _ = model.apply({"params": params}, *args, method="hidden")
  n = h.shape[0] * h.shape[1]
  chunk = min(chunk, n)
  pad = -n % chunk
  flat = lambda x: jnp.pad(x.reshape(n, *x.shape[2:]), [(0, pad)] + [(0, 0)] * (x.ndim - 2))
  h_c, t_c, m_c = (flat(x).reshape(-1, chunk, *x.shape[2:])
                   for x in (h, batch["targets"], mask))

  @jax.checkpoint
  def chunk_loss(params, h, t, m):
    logits = model.apply({"params": params}, h, method="logits")
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t) * m)

  def body(total, xs):
    return total + chunk_loss(params, *xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_c, t_c, m_c))
  return total, jnp.sum(mask)


def make_step(model, spec: lora_lib.LoraSpec, tx: optax.GradientTransformation,
              grad_accum: int = 1, loss_chunk: int | None = None) -> Callable:
  """``step(state, frozen, batch) -> (state, metrics)``, pure and unjitted. ``loss_chunk``:
  tokens per cross-entropy block (see ``token_loss_sum``)."""
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

  def loss_and_grads(trainable, frozen, batch):
    def loss(tr):
      params = lora_lib.with_adapters(optim.combine(tr["full"], frozen), tr["lora"], spec)
      return token_loss_sum(model, params, batch, loss_chunk)
    (total, count), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    return total, count, grads

  def step(state, frozen, batch):
    trainable = state["trainable"]
    if grad_accum == 1:
      total, count, grads = loss_and_grads(trainable, frozen, batch)
    else:
      rows = batch["inputs"].shape[0]
      if rows % grad_accum:
        raise ValueError(f"batch of {rows} rows is not divisible by grad_accum={grad_accum}")
      # Row i goes to micro-batch i % k: every micro-batch keeps rows on every data shard.
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape(rows // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
          batch)

      def body(carry, mb):
        total, count, grads = loss_and_grads(trainable, frozen, mb)
        acc = jax.tree_util.tree_map(jnp.add, carry, (total, count, grads))
        return acc, None

      zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
               jax.tree_util.tree_map(jnp.zeros_like, trainable))
      (total, count, grads), _ = jax.lax.scan(body, zeros, micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                                  for x in jax.tree_util.tree_leaves(new_trainable)] or [True]))
    new_state = {"step": state["step"] + 1, "trainable": new_trainable, "opt_state": opt_state}
    # "finite": the updated parameters are all finite (a checkpoint of them is usable).
    return new_state, {"loss": total / count, "tokens": count,
                       "grad_norm": optax.tree.norm(grads), "finite": finite}

  return step


def init_state(trainable: Any, tx: optax.GradientTransformation, mesh) -> dict:
  """Training state, created directly with its shardings: optimizer moments like the
  trainable leaf they belong to (``optax.tree_map_params``), everything else (step counts)
  replicated."""
  everywhere = sharding_lib.replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # multi_transform's "no state here"
  opt_shardings = optax.tree_map_params(
      tx, lambda leaf, sh: leaf if masked(leaf) else sh, jax.eval_shape(tx.init, trainable),
      shardings_of(trainable), transform_non_params=lambda _: everywhere, is_leaf=masked)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  step = jax.device_put(jnp.zeros((), jnp.int32), everywhere)
  return {"step": step, "trainable": trainable, "opt_state": opt_state}


def shardings_of(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def jit_step(step: Callable, state: Any, frozen: Any, mesh) -> Callable:
  """Jit ``step`` once with the shardings the state and frozen base already carry, batches
  split over data x fsdp, and the state donated."""
  batch_sh = sharding_lib.batch_sharding(mesh)
  state_sh = shardings_of(state)
  return jax.jit(step, in_shardings=(state_sh, shardings_of(frozen), batch_sh),
                 out_shardings=(state_sh, None), donate_argnums=(0,))


def compile_step(jitted: Callable, state: Any, frozen: Any, batch: Any) -> Callable:
  """Compile the jitted step ahead of its first call (``lower(...).compile()``), for these
  argument shapes. It is the same executable jit's own first call builds, but measured on
  XLA:CPU the process's peak RSS is lower this way (SmolLM2 LoRA, bench/memory.py: 1251
  vs 1464 MB; full fine-tuning 2795 vs 2979 MB), the steady steps included. Our reading
  (not proven): memory the compiler frees mid-call stays interleaved with the step's own
  allocations, where the allocator cannot reuse it for the step's temporaries."""
  return jitted.lower(state, frozen, batch).compile()
