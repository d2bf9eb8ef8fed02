"""The LoRA term s (x A) B as plain XLA matmuls: the one definition every XLA path shares.

jlora's models (``jlora.core.matmul``), ``jlora.apply`` on third-party Flax layers, and the
reference path of the fused Pallas matmul (``jlora.kernels.pallas``) all add the same
low-rank term, with the same casts: x A in x's dtype accumulated in f32, then the scale
applied to that thin [M, r] product and B taken in f32. The term lives here, beside the
kernels, rather than in ``jlora.core.matmul`` because that module imports ``jlora.kernels``
to dispatch to them; the kernels importing it back would be an import cycle.
``jlora.core.matmul`` re-exports ``lora_term``.

The term is split into its two thin products because callers share one of them:
``lora_dense_multi`` runs one ``lora_down`` for several adapters of the same input, and the
kernel's custom VJP saves ``t = x A`` for dB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_down(x_MK: jax.Array, a_KR: jax.Array) -> jax.Array:
  """t = x A: the thin down-projection, A cast to x's dtype, f32 [M, R]."""
  return jnp.dot(x_MK, a_KR.astype(x_MK.dtype), preferred_element_type=jnp.float32)


def lora_up(t_MR: jax.Array, b_RN: jax.Array, scale: float) -> jax.Array:
  """s t B: the up-projection of a ``lora_down`` result, in f32 [M, N]."""
  return jnp.dot(t_MR * scale, b_RN.astype(jnp.float32), preferred_element_type=jnp.float32)


def lora_term(x_MK: jax.Array, a_KR: jax.Array, b_RN: jax.Array, scale: float) -> jax.Array:
  """The LoRA term s (x A) B of 2-D (flattened) activations, never forming A B.

  Args:
    x_MK: activations, [tokens, features].
    a_KR, b_RN: the adapter factors.
    scale: the LoRA scale (alpha / r; 1.0 when B is pre-scaled).
  Returns:
    f32 [M, N]; the caller casts once, after adding it to the base projection.
  """
  return lora_up(lora_down(x_MK, a_KR), b_RN, scale)



def _by_rows(x_MK: jax.Array, w_NAB: jax.Array, sizes: tuple[int, ...], dtype) -> jax.Array:
  """Row block i of ``x`` times ``w[i]``, f32: one batched matmul when the blocks are equal
  (a group's batch: every run the same rows), else one matmul per block."""
  if sum(sizes) != x_MK.shape[0] or len(sizes) != w_NAB.shape[0]:
    raise ValueError(f"adapter row groups {sizes} do not cover {x_MK.shape[0]} rows of "
                     f"{w_NAB.shape[0]} adapters")
  w = w_NAB.astype(dtype)
  if len(set(sizes)) == 1:
    x = x_MK.reshape(len(sizes), sizes[0], x_MK.shape[-1])
    return jnp.einsum("nmk,nkr->nmr", x, w,
                      preferred_element_type=jnp.float32).reshape(x_MK.shape[0], -1)
  ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
  return jnp.concatenate([jnp.dot(x_MK[e - n:e], w[i], preferred_element_type=jnp.float32)
                          for i, (n, e) in enumerate(zip(sizes, ends))])


def lora_down_rows(x_MK: jax.Array, a_NKR: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
  """``lora_down`` of many adapters over rows grouped by adapter: the first ``sizes[0]``
  rows through A_0, the next ``sizes[1]`` through A_1, ... (``sizes`` static), f32 [M, R]."""
  return _by_rows(x_MK, a_NKR, sizes, x_MK.dtype)


def lora_up_rows(t_MR: jax.Array, b_NRN: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
  """``lora_up`` (B pre-scaled) of many adapters over rows grouped as ``lora_down_rows``."""
  return _by_rows(t_MR, b_NRN, sizes, jnp.float32)


def lora_term_rows(x_MK: jax.Array, a_NKR: jax.Array, b_NRN: jax.Array,
                   sizes: tuple[int, ...]) -> jax.Array:
  """Many adapters' LoRA terms over rows grouped by adapter: the first ``sizes[0]`` rows
  through adapter 0 (``(x A_0) B_0``, B pre-scaled), the next ``sizes[1]`` through adapter 1,
  and so on; ``sizes`` are static. Each adapter's term on its own rows: exact FLOPs, and on
  CPU faster than ``jax.lax.ragged_dot`` (16-35x), a one-hot mask (2-3.5x) or a per-row
  gather (bench/grouped_lora.py; bench/RESULTS.md "Grouped LoRA matmul"). f32 [M, N]."""
  return lora_up_rows(lora_down_rows(x_MK, a_NKR, sizes), b_NRN, sizes)


def lora_down_ids(x_BTK: jax.Array, a_NKR: jax.Array, ids_B: jax.Array) -> jax.Array:
  """``lora_down`` of many adapters with one adapter id per row (``ids`` may be traced:
  any mix of adapters runs one program): row b's tokens through ``A[ids[b]]``, f32
  [B, T, R]. Each row's factor is gathered ([B, K, R]: a row's, not a token's), then one
  batched matmul."""
  a = jnp.take(a_NKR, ids_B, axis=0).astype(x_BTK.dtype)
  return jnp.einsum("btk,bkr->btr", x_BTK, a, preferred_element_type=jnp.float32)


def lora_up_ids(t_BTR: jax.Array, b_NRN: jax.Array, ids_B: jax.Array) -> jax.Array:
  """``lora_up`` (B pre-scaled) with one adapter id per row, as ``lora_down_ids``."""
  b = jnp.take(b_NRN, ids_B, axis=0).astype(jnp.float32)
  return jnp.einsum("btr,brn->btn", t_BTR, b, preferred_element_type=jnp.float32)
