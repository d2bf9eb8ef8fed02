"""y = x W + s (x A) B as one fused Pallas matmul, with a custom VJP that never forms W + s A B.

Forward: the thin ``t = x A`` runs in XLA (f32, [M, r]); one kernel starts each output
tile's f32 accumulator at ``s t B`` and adds ``x W`` over K, so the LoRA term costs no extra
pass over y. Backward (W frozen): ``dS = s dY B^T`` (thin, XLA); one kernel computes
``dx = dY W^T + dS A^T`` contracting W on its last axis, so no transposed copy of W is ever
written; ``dA = x^T dS`` and ``dB = s t^T dY`` are thin XLA matmuls; dW is computed only
when W is being differentiated (full fine-tuning of the same kernel).

Two kernel layouts, one per compiler:
- "tpu" (Mosaic): grid (rows, cols, reduction) with the reduction axis last and
  "arbitrary"; the accumulator lives in VMEM scratch across it. Block dims are multiples of
  (8, 128) or the whole dim; the rank is zero-padded to 128 lanes (exact: zero columns of A,
  zero rows of B).
- "gpu" (Triton): grid (rows, cols); each program loops over the reduction in-kernel
  (Triton programs cannot carry state across grid steps). Triton needs power-of-two tiles
  of at least 16: the rank is zero-padded to a power of two >= 16.

Rows beyond M in the last row block are computed on padding and masked on write; they
never enter a reduction (rows are independent in both kernels). Reductions (K forward, N
backward) use tiles that divide the dim, so no padding is ever summed.

Which implementation runs is ``jlora.kernels.dispatch``'s decision (one set of names,
``IMPLS``); with "xla" the same custom VJP runs ``x W`` and the halves of
``jlora.kernels.reference.lora_term`` as XLA matmuls (the kernels' reference, differing from
them only in the two fused products). Inside a traced mesh context the kernels run per
batch shard (``mesh.over_batch_shards``): XLA cannot partition a Mosaic or Triton call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jlora.infra import mesh as mesh_lib
from jlora.kernels.dispatch import Kernel, choose
from jlora.kernels.reference import lora_down, lora_up

def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float = 1.0,
                *, impl: str = "auto", target: str | None = None,
                interpret_params=None) -> jax.Array:
  """x[..., K] @ w[K, N] + scale * (x @ a[K, r]) @ b[r, N] -> [..., N] in x's dtype.

  Matmuls accumulate in f32; w and a are cast to x's dtype tile by tile, b and the thin
  ``x a`` stay f32. Differentiable in x, w, a, b (custom VJP, see the module docstring).

  Args:
    x: activations; leading dims are flattened into M rows.
    w: the base kernel.
    a, b: LoRA factors (any rank r >= 1).
    scale: the LoRA scale (alpha / r), a Python number.
    impl: "auto", "xla", "pallas" or "interpret" (``dispatch.IMPLS``).
    target: kernel layout for "pallas"/"interpret": "tpu" or "gpu" (default: the
      backend's for "pallas", "tpu" for "interpret").
    interpret_params: for "interpret" with target "tpu", a ``pltpu.InterpretParams``
      (e.g. ``detect_races=True, num_cores_or_threads=2``) instead of the generic interpreter.
  """
  if x.shape[-1] != w.shape[0] or a.shape != (w.shape[0], a.shape[-1]) \
      or b.shape != (a.shape[-1], w.shape[1]) or w.ndim != 2:
    raise ValueError(f"lora_matmul: shapes x {x.shape}, w {w.shape}, a {a.shape}, b {b.shape} "
                     "do not chain as x[..., K] w[K, N], a[K, r] b[r, N]")
  kernel = choose(impl, target, interpret_params)
  lead, x_MK = x.shape[:-1], x.reshape(-1, x.shape[-1])
  fused = lambda x, w, a, b: _lora_matmul(x, w, a, b, float(scale), kernel)  # noqa: E731
  if kernel.target is not None:  # a Pallas call: per batch shard, whole weights
    fused = mesh_lib.over_batch_shards(fused, 4, x_MK.shape[0])
  return fused(x_MK, w, a, b).reshape(*lead, w.shape[1])


# ----------------------------------------------------------------------------- custom VJP

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lora_matmul(x, w, a, b, scale, kernel):
  return _forward(x, w, a, b, scale, kernel)[0]


def _forward(x, w, a, b, scale, kernel):
  t = lora_down(x, a)  # [M, r] f32, saved for dB
  if kernel.target is None:
    y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32) + lora_up(t, b, scale)
    return y.astype(x.dtype), t
  return _fused_forward(x, w, scale * t, b, kernel), t


def _lora_fwd(x, w, a, b, scale, kernel):
  # symbolic_zeros: each primal comes wrapped with a ``perturbed`` bit; dW is only
  # computed when W is differentiated.
  y, t = _forward(x.value, w.value, a.value, b.value, scale, kernel)
  return y, (x.value, w.value, a.value, b.value, t, w.perturbed)


def _lora_bwd(scale, kernel, res, dy):
  x, w, a, b, t, w_perturbed = res
  if type(dy) is jax.custom_derivatives.SymbolicZero:
    dy = jnp.zeros(dy.shape, dy.dtype)
  dy = dy.astype(x.dtype)
  contract_last = (((1,), (1,)), ((), ()))
  contract_first = (((0,), (0,)), ((), ()))
  u = lora_down(dy, b.T)  # dY B^T, [M, r] f32
  ds = scale * u
  if kernel.target is None:  # dY W^T + s (dY B^T) A^T: the transposed layer's LoRA term
    dx = (jax.lax.dot_general(dy, w.astype(dy.dtype), contract_last,
                              preferred_element_type=jnp.float32)
          + lora_up(u, a.T, scale)).astype(x.dtype)
  else:
    dx = _fused_dx(dy, w, ds, a, kernel).astype(x.dtype)
  da = jax.lax.dot_general(x, ds.astype(x.dtype), contract_first,
                           preferred_element_type=jnp.float32).astype(a.dtype)
  db = (scale * jax.lax.dot_general(t, dy.astype(jnp.float32), contract_first,
                                    preferred_element_type=jnp.float32)).astype(b.dtype)
  dw = None
  if w_perturbed:
    dw = jax.lax.dot_general(x, dy, contract_first,
                             preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw, da, db


_lora_matmul.defvjp(_lora_fwd, _lora_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- kernels

def _fused_forward(x, w, ts, b, kernel: Kernel):
  """x[M, K] @ w[K, N] + ts[M, r] @ b[r, N] -> [M, N] in x's dtype (ts = s x A, f32)."""
  return _fused(x, w, ts, b.astype(jnp.float32), x.dtype, kernel, w_transposed=False,
                name="lora_matmul_fwd")


def _fused_dx(dy, w, ds, a, kernel: Kernel):
  """dy[M, N] @ w[K, N]^T + ds[M, r] @ a[K, r]^T -> [M, K] f32, W contracted on its last
  axis inside the kernel (no transposed copy)."""
  return _fused(dy, w, ds, a.astype(jnp.float32), jnp.float32, kernel, w_transposed=True,
                name="lora_matmul_dx")


def _divisor_tile(dim: int, prefs: tuple[int, ...]) -> int:
  """The largest preferred tile that divides ``dim``, else the whole dim."""
  return next((p for p in prefs if dim % p == 0), dim)


def _pow2_at_least(n: int, floor: int) -> int:
  return max(floor, 1 << (n - 1).bit_length())


def _fused(lhs, w, low, low_w, out_dtype, kernel: Kernel, *, w_transposed: bool, name: str):
  """lhs[M, R] . w + low[M, r] . low_w -> [M, P] with f32 accumulation, where "." is a
  matmul (w [R, P], low_w [r, P]) or, with ``w_transposed``, a matmul against the
  transpose (w [P, R], low_w [P, r]), contracted in-kernel. The low-rank product seeds the
  accumulator; the rank is zero-padded to what the target needs (exact)."""
  m, red = lhs.shape
  p = w.shape[0] if w_transposed else w.shape[1]
  r = low.shape[1]
  r_pad = (-r % 128) if kernel.target == "tpu" else _pow2_at_least(r, 16) - r
  if r_pad:
    low = jnp.pad(low, ((0, 0), (0, r_pad)))
    low_w = jnp.pad(low_w, ((0, 0), (0, r_pad)) if w_transposed else ((0, r_pad), (0, 0)))
  r += r_pad
  dims = (((1,), (1,)), ((), ())) if w_transposed else (((1,), (0,)), ((), ()))
  dot = lambda u, v: jax.lax.dot_general(u, v, dims, preferred_element_type=jnp.float32)
  out = jax.ShapeDtypeStruct((m, p), out_dtype)
  layout = _fused_tpu if kernel.target == "tpu" else _fused_gpu
  return layout((lhs, w, low, low_w), out, dot, r, kernel, w_transposed, name)


def _fused_tpu(args, out, dot, r, kernel: Kernel, w_transposed: bool, name: str):
  """The Mosaic layout of ``_fused`` (``args`` = lhs, w, low, low_w, rank padded to r)."""
  from jax.experimental.pallas import tpu as pltpu
  (m, red), p = args[0].shape, out.shape[1]
  # Mosaic: blocks are multiples of (8, 128) or whole dims; the reduction is the last,
  # "arbitrary" grid axis and the accumulator stays in VMEM across it.
  bm = m if m <= 256 else 256  # an edge block past M is masked on write
  bp, br = _divisor_tile(p, (512, 256, 128)), _divisor_tile(red, (512, 256, 128))
  steps = red // br
  w_block = (bp, br) if w_transposed else (br, bp)
  w_index = (lambda i, j, k: (j, k)) if w_transposed else (lambda i, j, k: (k, j))
  lw_block = (bp, r) if w_transposed else (r, bp)
  lw_index = (lambda i, j, k: (j, 0)) if w_transposed else (lambda i, j, k: (0, j))

  def body(lhs_ref, w_ref, low_ref, low_w_ref, out_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
      acc_ref[...] = dot(low_ref[...], low_w_ref[...])

    acc_ref[...] += dot(lhs_ref[...], w_ref[...].astype(lhs_ref.dtype))

    @pl.when(k == steps - 1)
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  return pl.pallas_call(
      body, out_shape=out, grid=(pl.cdiv(m, bm), p // bp, steps),
      in_specs=[pl.BlockSpec((bm, br), lambda i, j, k: (i, k)), pl.BlockSpec(w_block, w_index),
                pl.BlockSpec((bm, r), lambda i, j, k: (i, 0)),
                pl.BlockSpec(lw_block, lw_index)],
      out_specs=pl.BlockSpec((bm, bp), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bp), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=kernel.interpret, name=name)(*args)


def _fused_gpu(args, out, dot, r, kernel: Kernel, w_transposed: bool, name: str):
  """The Triton layout of ``_fused``: power-of-two tiles >= 16; each program loops over
  the reduction itself (Triton programs cannot carry state across grid steps)."""
  (m, red), p = args[0].shape, out.shape[1]
  bm = min(128, _pow2_at_least(m, 16))  # rows past M are masked on load and store
  bp, br = _divisor_tile(p, (128, 64, 32, 16)), _divisor_tile(red, (64, 32, 16))
  for dim, tile in ((p, bp), (red, br)):
    if tile & (tile - 1) or tile < 16:
      raise ValueError(f"lora_matmul GPU kernel: dim {dim} has no power-of-two tile >= 16 "
                       "dividing it; use impl='xla' for this shape")
  steps = red // br
  w_block = (bp, red) if w_transposed else (red, bp)
  w_index = (lambda i, j: (j, 0)) if w_transposed else (lambda i, j: (0, j))
  lw_block = (bp, r) if w_transposed else (r, bp)
  lw_index = (lambda i, j: (j, 0)) if w_transposed else (lambda i, j: (0, j))

  def body(lhs_ref, w_ref, low_ref, low_w_ref, out_ref):
    def step(k, acc):
      cols = pl.ds(pl.multiple_of(k * br, br), br)
      w_tile = w_ref[:, cols] if w_transposed else w_ref[cols, :]
      return acc + dot(lhs_ref[:, cols], w_tile.astype(lhs_ref.dtype))

    acc = dot(low_ref[...], low_w_ref[...])
    out_ref[...] = jax.lax.fori_loop(0, steps, step, acc).astype(out_ref.dtype)

  from jax.experimental.pallas import triton as pltriton
  return pl.pallas_call(
      body, out_shape=out, grid=(pl.cdiv(m, bm), p // bp),
      in_specs=[pl.BlockSpec((bm, red), lambda i, j: (i, 0)), pl.BlockSpec(w_block, w_index),
                pl.BlockSpec((bm, r), lambda i, j: (i, 0)), pl.BlockSpec(lw_block, lw_index)],
      out_specs=pl.BlockSpec((bm, bp), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=8 if bm * bp >= 128 * 128 else 4,
                                              num_stages=3),
      interpret=kernel.interpret, name=name)(*args)
