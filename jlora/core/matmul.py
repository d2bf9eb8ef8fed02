"""The one place a LoRA matmul happens: y = x W + s (x A) B, never materialising W + s A B.

``lora_term`` is the low-rank term s (x A) B on 2-D activations, the definition every XLA
path shares (it lives in ``jlora.kernels.reference`` so the kernels' reference can use it
without importing this module back). Its callers:

- ``lora_dense`` / ``lora_dense_multi``: the hot path of jlora's own models. Activations
  are flattened to 2-D ``[tokens, features]`` first (on 3-D activations XLA transposes them
  for every weight gradient), the thin matmuls accumulate in f32, and the frozen base is
  never differentiated.
- ``lora_einsum``: the same term for a layer whose contraction is an einsum (third-party
  Flax Dense, DenseGeneral, Einsum under ``jlora.apply``); a plain dense contraction is
  flattened and runs as ``lora_term`` itself.
- ``lora_ragged_dot``: the same two thin products per expert, for tokens sorted by expert.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math

import jax
import jax.numpy as jnp

from jlora import kernels
from jlora.core import quant
from jlora.kernels.reference import (lora_down, lora_down_ids, lora_down_rows, lora_term,
                                     lora_up, lora_up_ids, lora_up_rows)

__all__ = ["adapter_ids", "adapter_rows", "einsum_layout", "lora_dense", "lora_dense_multi", "lora_einsum",
           "lora_ragged_dot", "lora_term"]

# How many batch rows each stacked adapter owns while a model runs (``adapter_rows``), or
# each row's adapter (``adapter_ids``).
_ROWS: contextvars.ContextVar = contextvars.ContextVar("adapter_rows", default=None)
_IDS: contextvars.ContextVar = contextvars.ContextVar("adapter_ids", default=None)


@contextlib.contextmanager
def adapter_rows(sizes: tuple[int, ...]):
  """Within this context, stacked adapter factors (``jlora.core.stack``: a leading adapter
  axis on A and B) apply adapter 0 to the first ``sizes[0]`` rows of every activation
  ``[B, ...]``, adapter 1 to the next ``sizes[1]``, and so on (static: a group's batch
  holds each run's rows together, in adapter order). A context rather than an argument
  threaded through every layer: it is read where the factors meet the activations."""
  token = _ROWS.set(tuple(int(n) for n in sizes))
  try:
    yield
  finally:
    _ROWS.reset(token)


@contextlib.contextmanager
def adapter_ids(ids_B: jax.Array):
  """Within this context, stacked adapter factors apply adapter ``ids_B[b]`` to row b of
  every activation ``[B, ...]``: any mix of adapters in any order. ``ids_B`` is data (int
  [B], traced under jit), so one compiled program serves every mix: what mixed-adapter
  generation uses (``models.sample(adapter_ids=...)``). Each row's factors are gathered
  ([B, K, r] per projection): cheap for decoding's few rows; a training batch whose rows
  are grouped by adapter takes ``adapter_rows`` (one matmul per adapter, no gather)."""
  token = _IDS.set(ids_B)
  try:
    yield
  finally:
    _IDS.reset(token)


def _stacked_terms(x_MK: jax.Array, lead: tuple[int, ...], a_NKR: jax.Array, bs: list,
                   ranks: list[int]) -> list[jax.Array]:
  """Stacked adapters' terms ``(x A_i) B_i`` (B pre-scaled), f32 [M, N_i] each, one
  ``x A`` shared by the projections, per row by ``adapter_ids`` or by row blocks
  (``adapter_rows``)."""
  cuts = list(itertools.accumulate(ranks))[:-1]
  ids = _IDS.get()
  if ids is not None:
    if not lead or ids.shape != (lead[0],):
      raise ValueError(f"adapter ids of shape {ids.shape} for activations {lead}")
    t = lora_down_ids(x_MK.reshape(lead[0], -1, x_MK.shape[-1]), a_NKR, ids)
    return [lora_up_ids(t_i, b, ids).reshape(x_MK.shape[0], -1)
            for t_i, b in zip(jnp.split(t, cuts, axis=-1), bs)]
  sizes = _row_sizes(lead)
  t = lora_down_rows(x_MK, a_NKR, sizes)
  return [lora_up_rows(t_i, b, sizes) for t_i, b in zip(jnp.split(t, cuts, axis=1), bs)]


def _row_sizes(lead: tuple[int, ...]) -> tuple[int, ...]:
  """Each adapter's flattened tokens in activations with leading dims ``lead``."""
  sizes = _ROWS.get()
  if sizes is None:
    raise ValueError("stacked adapters (a leading adapter axis) need each adapter's rows: "
                     "run the model inside jlora.core.matmul.adapter_rows(sizes) or "
                     "adapter_ids(ids)")
  if not lead or lead[0] != sum(sizes):
    raise ValueError(f"adapter rows {sizes} for activations {lead}")
  per_row = math.prod(lead[1:])
  return tuple(n * per_row for n in sizes)


def lora_dense(x: jax.Array, kernel: jax.Array, a: jax.Array | None = None,
               b: jax.Array | None = None, scale: float = 1.0, impl: str = "xla") -> jax.Array:
  """x[..., K] @ kernel[K, N] (+ scale * (x @ a[K, r]) @ b[r, N]) -> [..., N].

  Args:
    x: activations; every leading dim is flattened into one token axis.
    kernel: 2-D weight (frozen under LoRA; trainable in full fine-tuning).
    a, b: adapter factors, or None for the plain projection.
    scale: the LoRA scale (alpha / r).
    impl: a model-level implementation, see ``lora_dense_multi``.
  Returns:
    The projection in x's dtype.
  """
  return lora_dense_multi(x, [(kernel, a, b)], scale, impl)[0]


def lora_dense_multi(x: jax.Array, projections, scale: float = 1.0,
                     impl: str = "xla") -> list[jax.Array]:
  """Several projections of the same input (q/k/v, gate/up) as one base GEMM and one thin
  ``x @ [A_1 | A_2 | ...]`` GEMM; each output gets its own ``t_i @ B_i``.

  The thin LoRA matmuls and their weight gradients read all of x for r columns; sharing
  them across projections of one input reads x once. Differentiated by JAX (why not a
  custom VJP: docs/ARCHITECTURE.md, "Autodiff, not a custom VJP, for the XLA path").

  Args:
    x: [..., K] activations.
    projections: sequence of (kernel [K, N_i], a [K, r_i] or None, b [r_i, N_i] or None).
    scale: LoRA scale applied to every adapter (1.0 when B is pre-scaled).
    impl: ``model.lora_impl`` (``jlora.kernels.IMPLS``). When it selects a Pallas kernel
      (on this backend) and some projection is adapted, the projections run as one fused
      LoRA matmul: kernels concatenated, A's concatenated, the B's laid out
      block-diagonally (exact: the off-diagonal blocks are zero, and their gradient is
      dropped). Otherwise ("xla") the XLA matmuls below, differentiated by JAX: one
      ``x W`` and the halves of ``lora_term``, one ``lora_down`` shared by all adapters.
      Stacked factors (A [N, K, r], B [N, r, N_i] pre-scaled: ``jlora.core.stack``) take
      the XLA path whatever ``impl`` says: each adapter's term on its rows (row blocks,
      ``adapter_rows``, or an id per row, ``adapter_ids``; one ``x A`` shared by the
      projections).
  Returns:
    One [..., N_i] output per projection, in x's dtype.
  """
  lead, k = x.shape[:-1], x.shape[-1]
  x_MK = x.reshape(-1, k)
  widths = [w.shape[-1] for w, _, _ in projections]
  cuts = list(itertools.accumulate(widths))[:-1]
  adapted = [(i, a, b) for i, (_, a, b) in enumerate(projections) if a is not None]
  quantized = any(quant.is_quantized(w) for w, _, _ in projections)
  stacked = any(a.ndim == 3 for _, a, _ in adapted)  # jlora.core.stack: one per row group
  if adapted and not stacked and kernels.selects_pallas(impl) and not quantized:  # the kernel takes dense W
    w_dtype = projections[0][0].dtype  # the kernel up-casts W tile by tile: no f32 copy
    y_MN = kernels.lora_matmul(
        x_MK, _concat([w for w, _, _ in projections], w_dtype),
        _concat([a for _, a, _ in adapted], x.dtype), _block_diagonal(adapted, widths), scale,
        impl=impl)
    return [y.reshape(*lead, n) for y, n in zip(jnp.split(y_MN, cuts, axis=1), widths)]
  y_MN = jnp.dot(x_MK, _concat([w for w, _, _ in projections], x.dtype),
                 preferred_element_type=jnp.float32)
  outs = jnp.split(y_MN, cuts, axis=1)
  if stacked:  # B pre-scaled per adapter (stack.with_adapters); one x A for all of them
    a_NKR = jnp.concatenate([a for _, a, _ in adapted], axis=-1) if len(adapted) > 1 \
        else adapted[0][1]
    terms = _stacked_terms(x_MK, lead, a_NKR, [b for _, _, b in adapted],
                           [a.shape[-1] for _, a, _ in adapted])
    for (i, _, _), term in zip(adapted, terms):
      outs[i] = outs[i] + term
  elif adapted:
    t_MR = lora_down(x_MK, _concat([a for _, a, _ in adapted], x.dtype))
    ranks = [a.shape[-1] for _, a, _ in adapted]
    for (i, _, b), t in zip(adapted, jnp.split(t_MR, list(itertools.accumulate(ranks))[:-1],
                                               axis=1)):
      outs[i] = outs[i] + lora_up(t, b, scale)
  return [y.astype(x.dtype).reshape(*lead, n) for y, n in zip(outs, widths)]


def _concat(arrays, dtype) -> jax.Array:
  """Column-wise concatenation in ``dtype`` (no copy for a single array of that dtype)."""
  arrays = [quant.dense(x, dtype) for x in arrays]
  return jnp.concatenate(arrays, axis=1) if len(arrays) > 1 else arrays[0]


def _block_diagonal(adapted, widths) -> jax.Array:
  """[sum r_i, sum N] f32: each adapted projection's B in its rows and its output columns."""
  offsets = [0, *itertools.accumulate(widths)]
  total = offsets[-1]
  return jnp.concatenate(
      [jnp.pad(b.astype(jnp.float32), ((0, 0), (offsets[i], total - offsets[i + 1])))
       for i, _, b in adapted], axis=0)


def _fresh_letter(used: str) -> str:
  return next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in used)


def lora_einsum(equation: str, x: jax.Array, a: jax.Array, b: jax.Array,
                scale: float = 1.0) -> jax.Array:
  """The LoRA term of ``einsum(equation, x, kernel)``: ``lora_term`` for any contraction.

  The kernel's letters are split by role: in x and in the output (stacked, e.g. experts),
  only in x (contracted: A's input axes) or only in the output (B's output axes). A is
  indexed [stacked..., in..., r] and B [stacked..., r, out...], as ``jlora.core.lora`` builds them.
  A dense contraction (x's last axis against a [K, N] kernel, e.g. "...i,io->...o") is
  flattened to 2-D and runs as ``lora_term``; any other as the same two thin products,
  written as einsums with the same casts.

  Args:
    equation: the layer's "x,kernel->y" einsum (an ellipsis in x and y is allowed).
    x: layer input.
    a, b: adapter factors for this layer's kernel (stacked/scanned axes already sliced).
    scale: the LoRA scale.
  Returns:
    The LoRA term, shaped like the layer output, in x's dtype.
  """
  lhs, out = equation.replace(" ", "").split("->")
  xs, ks = lhs.split(",")
  stacked = "".join(c for c in ks if c in xs and c in out)
  contracted = "".join(c for c in ks if c in xs and c not in out)
  produced = "".join(c for c in ks if c not in xs and c in out)
  if len(stacked + contracted + produced) != len(ks):
    raise ValueError(f"einsum {equation!r}: every kernel axis must be an input, output or "
                     "stacked axis to take a LoRA adapter")
  if not stacked and len(contracted) == len(produced) == 1 and xs[-1:] == contracted \
      and out == xs[:-1] + produced:
    y = lora_term(x.reshape(-1, x.shape[-1]), a, b, scale)
    return y.astype(x.dtype).reshape(*x.shape[:-1], b.shape[-1])
  r = _fresh_letter(xs + ks + out)
  t_sub = "".join(c for c in out if c not in produced) + r
  t = jnp.einsum(f"{xs},{stacked}{contracted}{r}->{t_sub}", x, a.astype(x.dtype),
                 preferred_element_type=jnp.float32)
  y = jnp.einsum(f"{t_sub},{stacked}{r}{produced}->{out}", t * scale, b.astype(jnp.float32),
                 preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def einsum_layout(equation: str) -> str:
  """Kernel layout (one of b/i/o per kernel axis) implied by an "x,kernel->y" einsum."""
  lhs, out = equation.replace(" ", "").split("->")
  xs, ks = lhs.split(",")
  return "".join("b" if c in xs and c in out else "i" if c in xs else "o" for c in ks)


def lora_ragged_dot(x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array,
                    a_EKR: jax.Array | None = None, b_ERN: jax.Array | None = None,
                    scale: float = 1.0) -> jax.Array:
  """Per-expert x @ W_e (+ ``lora_term`` with A_e, B_e) for tokens sorted by expert.

  The first ``group_sizes[0]`` rows go to expert 0, the next ``group_sizes[1]`` to expert 1,
  and so on (``jax.lax.ragged_dot``); accumulation in f32, with ``lora_term``'s casts.
  """
  def dot(lhs, rhs):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes_E, preferred_element_type=jnp.float32)

  y = dot(x_MK, quant.dense(w_EKN, x_MK.dtype))
  if a_EKR is not None:
    y = y + dot(dot(x_MK, a_EKR.astype(x_MK.dtype)) * scale, b_ERN.astype(jnp.float32))
  return y.astype(x_MK.dtype)
