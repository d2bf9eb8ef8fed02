"""The training step: one pure function for every objective, jitted once with explicit
shardings.

``state = {"step", "trainable": {"lora", "full"}, "opt_state"}`` is donated; the frozen base
is a separate, never-donated argument. An objective is a ``loss_fn(trainable, frozen,
batch) -> (sum, count[, aux])``: ``lm_loss`` is supervised fine-tuning's (a batch is
``{"inputs", "targets": int [B, T], "mask": [B, T]}`` plus optional ``"segment_ids"`` /
``"positions"`` for packed rows); policy-gradient RL and the studies supply their own and
reuse the same step, state, shardings and loop (``jlora.run.loop``). With gradient
accumulation the micro-batches' *sums* and counts are accumulated and divided once, so k
micro-batches give exactly the gradient of the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jlora.core import sharding as sharding_lib, stack
from jlora.infra import mesh as mesh_lib

LossFn = Callable[..., tuple]  # (trainable, frozen, batch) -> (sum, count[, aux sums])


_AUX_START = {"_min": jnp.inf, "_max": -jnp.inf}  # aux reduced by min / max, not summed


def _combine_aux(a: dict, b: dict) -> dict:
  return {k: jnp.minimum(a[k], b[k]) if k.endswith("_min") else
          jnp.maximum(a[k], b[k]) if k.endswith("_max") else a[k] + b[k] for k in a}


def _accumulate(loss_and_grads, trainable, frozen, batch, k: int):
  """(total, count, aux, grads) summed over k micro-batches (row i -> micro-batch i % k:
  every micro-batch keeps rows on every data shard); aux combined by ``_combine_aux``."""
  rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
  if rows % k:
    raise ValueError(f"batch of {rows} rows is not divisible by grad_accum={k}")
  micro = jax.tree_util.tree_map(
      lambda x: x.reshape(rows // k, k, *x.shape[1:]).swapaxes(0, 1), batch)
  shapes = jax.eval_shape(loss_and_grads, trainable, frozen,
                          jax.tree_util.tree_map(lambda x: x[0], micro))
  zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  zeros = (*zeros[:2], {n: jnp.full(v.shape, _AUX_START.get(n[-4:], 0.0), v.dtype)
                        for n, v in zeros[2].items()}, zeros[3])

  def body(carry, mb):
    total, count, aux, grads = loss_and_grads(trainable, frozen, mb)
    return (carry[0] + total, carry[1] + count, _combine_aux(carry[2], aux),
            jax.tree_util.tree_map(jnp.add, carry[3], grads)), None

  return jax.lax.scan(body, zeros, micro)[0]


def _normalised(grads, count, adapter_axes):
  """(gradients divided by the token count, their norm): one count, or with stacked
  adapters one per adapter (each adapter's slices by its own count, a norm each)."""
  if adapter_axes is None:
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    return grads, optax.tree.norm(grads)
  lora = jax.tree_util.tree_map(lambda g, ax: g / stack.along(count, ax, g.ndim),
                                grads["lora"], adapter_axes)
  return ({"full": grads["full"], "lora": lora},
          jnp.sqrt(stack.sq_norms(lora, adapter_axes, count.shape[0])))


def _finite(trainable, adapter_axes, count) -> jax.Array:
  """Whether the updated parameters are all finite; per adapter with stacked adapters (one
  that diverges does not stop the others)."""
  if adapter_axes is None:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                                for x in jax.tree_util.tree_leaves(trainable)] or [True]))
  bad = jax.tree_util.tree_map(lambda x: jnp.where(jnp.isfinite(x), 0.0, 1.0), trainable["lora"])
  return stack.sq_norms(bad, adapter_axes, count.shape[0]) == 0


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, grad_accum: int = 1,
              adapter_axes: Any = None) -> Callable:
  """The one training step: ``step(state, frozen, batch) -> (state, metrics)``, pure and
  unjitted (``jit_step`` jits it), for any objective.

  Args:
    loss_fn: ``loss_fn(trainable, frozen, batch) -> (total, count)`` or ``(total, count,
      aux)``: a *sum* of per-token (or per-example) losses, the number of terms it sums,
      and optionally a dict of scalars to report: sums over the same terms, reported as
      means (divided by the count), except names ending in ``_min`` / ``_max``, reduced
      across micro-batches by min / max and reported as they are. The step divides once, after
      accumulation: k micro-batches give exactly the gradient of the whole batch, however
      unevenly their masks fall. ``lm_loss`` is the supervised one.
    tx: the optimizer (``optim.optimizer``).
    grad_accum: micro-batches per step; batch row i goes to micro-batch i % grad_accum.
    adapter_axes: for stacked adapters (``jlora.core.stack``), their ``adapter_axes``: then
      ``loss_fn`` returns a total and a count per adapter (``[N]`` each), and adapter i's
      gradient is divided by its own count: exactly its solo gradient.
  Returns:
    The step. Metrics: ``loss`` (total / count), ``tokens`` (count), ``grad_norm``,
    ``finite`` (the updated parameters are all finite: a checkpoint of them is usable),
    and the objective's aux metrics under their own names. With ``adapter_axes``,
    ``loss``, ``tokens``, ``grad_norm`` and ``finite`` are ``[N]``, one per adapter.
  """
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

  def loss_and_grads(trainable, frozen, batch):
    def loss(tr):  # per-adapter totals: each adapter's slices see only its own total
      total, count, *aux = loss_fn(tr, frozen, batch)
      return jnp.sum(total), (total, count, aux[0] if aux else {})
    (_, (total, count, aux)), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    return total, count, aux, grads

  def step(state, frozen, batch):
    trainable = state["trainable"]
    if grad_accum == 1:
      total, count, aux, grads = loss_and_grads(trainable, frozen, batch)
    else:
      total, count, aux, grads = _accumulate(loss_and_grads, trainable, frozen, batch,
                                             grad_accum)
    count = jnp.maximum(count, 1.0)
    grads, grad_norm = _normalised(grads, count, adapter_axes)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    finite = _finite(new_trainable, adapter_axes, count)
    new_state = {"step": state["step"] + 1, "trainable": new_trainable, "opt_state": opt_state}
    aux = {k: v if k[-4:] in _AUX_START else v / count for k, v in aux.items()}
    return new_state, {**aux, "loss": total / count, "tokens": count,
                       "grad_norm": grad_norm, "finite": finite}

  return step


def build(loss_fn: LossFn, tx: optax.GradientTransformation, trainable: Any, frozen: Any,
          mesh=None, grad_accum: int = 1, example_batch: Any = None,
          adapter_axes: Any = None, state: Any = None) -> tuple[Callable, dict]:
  """The one way to get a train step: ``(step, state)``, where ``step(state, frozen,
  batch) -> (state, metrics)`` is ``make_step``'s step jitted with the state's and the
  frozen base's shardings, batches split over data x fsdp and the state donated, and
  ``state`` is ``init_state``'s (it owns ``trainable`` from here on). With
  ``example_batch`` the step is compiled ahead for its shapes (``compile_step``).
  ``trainable`` / ``frozen`` of ``jax.ShapeDtypeStruct`` leaves (with shardings) give an
  abstract state: a step to lower or export, not to run. ``mesh=None``: one device.
  ``adapter_axes``: stacked adapters, one loss per adapter (``make_step``). ``state``: a
  state to go on from instead (a restored one: ``init_state``'s layout, ``trainable`` its
  own), placed with the shardings a fresh one would have."""
  if state is None:
    state = init_state(trainable, tx, mesh)
  else:
    state = jax.device_put(state, sharding_lib.state_shardings(
        tx, trainable, mesh_lib.single_device_mesh() if mesh is None else mesh))
  step = jit_step(make_step(loss_fn, tx, grad_accum, adapter_axes), state, frozen, mesh)
  if example_batch is not None:
    step = compile_step(step, state, frozen, example_batch)
  return step, state


def init_state(trainable: Any, tx: optax.GradientTransformation, mesh=None) -> dict:
  """Training state, created directly with its shardings (``sharding.state_shardings``:
  optimizer moments like the leaf they belong to, step counts replicated). ``mesh=None``:
  one device, for scripts and notebooks. Abstract leaves give an abstract state."""
  mesh = mesh_lib.single_device_mesh() if mesh is None else mesh
  shardings = sharding_lib.state_shardings(tx, trainable, mesh)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(trainable)):
    shapes = jax.eval_shape(lambda t: {"step": jnp.zeros((), jnp.int32), "trainable": t,
                                       "opt_state": tx.init(t)}, trainable)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        shapes, shardings)
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(trainable)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"step": step, "trainable": trainable, "opt_state": opt_state}


def jit_step(step: Callable, state: Any, frozen: Any, mesh=None) -> Callable:
  """Jit ``step`` once with the shardings the state and frozen base already carry, batches
  split over data x fsdp, and the state donated."""
  mesh = mesh_lib.single_device_mesh() if mesh is None else mesh
  state_sh = mesh_lib.shardings_of(state)
  return jax.jit(mesh_lib.traced_in(step, mesh),
                 in_shardings=(state_sh, mesh_lib.shardings_of(frozen),
                                     mesh_lib.batch_sharding(mesh, 1)),
                 out_shardings=(state_sh, None), donate_argnums=(0,))


def compile_step(jitted: Callable, state: Any, frozen: Any, batch: Any) -> Callable:
  """Compile the jitted step ahead of its first call (``lower(...).compile()``), for these
  argument shapes: the same executable jit's own first call builds. Why ahead of the call
  (a lower process peak): bench/RESULTS.md, "Notes moved from docstrings", train step
  memory."""
  return jitted.lower(state, frozen, batch).compile()
