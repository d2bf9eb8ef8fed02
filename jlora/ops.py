"""The one place a LoRA matmul happens: y = x W + s (x A) B, never materialising W + s A B.

``lora_dense`` is the hot path of jlora's own models: activations are flattened to 2-D
``[tokens, features]`` first (on 3-D activations XLA transposes them for every weight
gradient, ~1.7x slower on CPU, see KERNEL.md), the thin matmuls accumulate in f32, and the
frozen base is never differentiated. ``lora_einsum`` is the general form used to add an
adapter to third-party Flax layers (DenseGeneral, Einsum) whose contraction is an einsum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lora_dense(x: jax.Array, kernel: jax.Array, a: jax.Array | None = None,
               b: jax.Array | None = None, scale: float = 1.0) -> jax.Array:
  """x[..., K] @ kernel[K, N] (+ scale * (x @ a[K, r]) @ b[r, N]) -> [..., N].

  Args:
    x: activations; every leading dim is flattened into one token axis.
    kernel: frozen 2-D weight.
    a, b: adapter factors, or None for the plain projection.
    scale: the LoRA scale (alpha / r).
  Returns:
    The projection in x's dtype.
  """
  lead, k = x.shape[:-1], x.shape[-1]
  x_MK = x.reshape(-1, k)
  y_MN = jnp.dot(x_MK, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
  if a is not None:
    t_MR = jnp.dot(x_MK, a.astype(x.dtype), preferred_element_type=jnp.float32)
    y_MN = y_MN + jnp.dot(t_MR * scale, b.astype(jnp.float32),
                          preferred_element_type=jnp.float32)
  return y_MN.astype(x.dtype).reshape(*lead, kernel.shape[-1])


def _fresh_letter(used: str) -> str:
  return next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in used)


def lora_einsum(equation: str, x: jax.Array, a: jax.Array, b: jax.Array,
                scale: float = 1.0) -> jax.Array:
  """The LoRA term of ``einsum(equation, x, kernel)``, computed as (x A) B.

  The kernel's letters are split by role: in x and in the output (stacked, e.g. experts),
  only in x (contracted: A's input axes) or only in the output (B's output axes). A is
  indexed [stacked..., in..., r] and B [stacked..., r, out...], as ``jlora.lora`` builds them.

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
  """Per-expert x @ W_e (+ scale * (x @ A_e) @ B_e) for tokens sorted by expert.

  Rows ``group_sizes[0]`` rows go to expert 0, the next ``group_sizes[1]`` to expert 1, and
  so on (``jax.lax.ragged_dot``); accumulation in f32.
  """
  y = jax.lax.ragged_dot(x_MK, w_EKN.astype(x_MK.dtype), group_sizes_E,
                         preferred_element_type=jnp.float32)
  if a_EKR is not None:
    t = jax.lax.ragged_dot(x_MK, a_EKR.astype(x_MK.dtype), group_sizes_E,
                           preferred_element_type=jnp.float32)
    y = y + jax.lax.ragged_dot(t * scale, b_ERN.astype(jnp.float32), group_sizes_E,
                               preferred_element_type=jnp.float32)
  return y.astype(x_MK.dtype)
