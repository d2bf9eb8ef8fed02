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


def token_loss_sum(model, params, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of masked token cross-entropies in f32, number of masked-in tokens)."""
  logits, _ = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                          batch.get("segment_ids"))
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch["mask"].astype(jnp.float32)
  return jnp.sum(xent * mask), jnp.sum(mask)


def make_step(model, spec: lora_lib.LoraSpec, tx: optax.GradientTransformation,
              grad_accum: int = 1) -> Callable:
  """``step(state, frozen, batch) -> (state, metrics)``, pure and unjitted."""
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

  def loss_and_grads(trainable, frozen, batch):
    def loss(tr):
      params = lora_lib.with_adapters(optim.combine(tr["full"], frozen), tr["lora"], spec)
      return token_loss_sum(model, params, batch)
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
    new_state = {"step": state["step"] + 1,
                 "trainable": optax.apply_updates(trainable, updates),
                 "opt_state": opt_state}
    return new_state, {"loss": total / count, "tokens": count,
                       "grad_norm": optax.tree.norm(grads)}

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
