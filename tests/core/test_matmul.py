"""jlora.core.matmul: the LoRA matmuls against their definitions (separate projections, the
merged delta, a per-expert loop), dtypes, and the fused multi-projection path vs XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.core import matmul
from jlora.core import matmul as matmul_lib
from tests.helpers import fresh_seed, rel_err


def test_lora_dense_multi_fused_equals_xla():
  """q/k/v-like projections, one without an adapter: the fused path (kernels concatenated,
  B block-diagonal) equals the separate XLA matmuls, values and gradients."""
  seed = fresh_seed()
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 9, 64)), jnp.float32)
  ws = [jnp.asarray(rng.standard_normal((64, n)) / 8, jnp.float32) for n in (64, 32, 32)]
  ads = [(jnp.asarray(rng.standard_normal((64, r)) / 8, jnp.float32),
          jnp.asarray(rng.standard_normal((r, n)) / 4, jnp.float32))
         for r, n in ((8, 64), (4, 32))]

  def loss(impl, x, ads):
    projections = [(ws[0], *ads[0]), (ws[1], None, None), (ws[2], *ads[1])]
    outs = matmul_lib.lora_dense_multi(x, projections, 0.7, impl)
    return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs))

  ref = jax.value_and_grad(lambda *p: loss("xla", *p), argnums=(0, 1))(x, ads)
  got = jax.value_and_grad(lambda *p: loss("interpret", *p), argnums=(0, 1))(x, ads)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert rel_err(g, r) <= 1e-5, seed


def _rand(key, *shape):
  return jax.random.normal(key, shape)


def test_lora_dense_multi_equals_separate_projections():
  k = jax.random.split(jax.random.PRNGKey(0), 8)
  x = _rand(k[0], 2, 5, 12)
  wq, wk, wv = _rand(k[1], 12, 8), _rand(k[2], 12, 4), _rand(k[3], 12, 4)
  aq, bq = _rand(k[4], 12, 3), _rand(k[5], 3, 8)
  av, bv = _rand(k[6], 12, 2), _rand(k[7], 2, 4)
  projections = [(wq, aq, bq), (wk, None, None), (wv, av, bv)]

  def reference(x, projections, scale):
    x2 = x.reshape(-1, 12)
    outs = []
    for w, a, b in projections:
      y = x2 @ w + (0 if a is None else scale * (x2 @ a) @ b)
      outs.append(y.reshape(2, 5, -1))
    return outs

  got = matmul.lora_dense_multi(x, projections, 0.5)
  for g, r in zip(got, reference(x, projections, 0.5)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda p: sum(jnp.sum(jnp.sin(y)) for y in f(x, p, 0.5))
  g1 = jax.grad(loss(matmul.lora_dense_multi))(projections)
  g2 = jax.grad(loss(reference))(projections)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_lora_dense_dtypes(dtype, tol):
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  x, w = _rand(k[0], 7, 16).astype(dtype), _rand(k[1], 16, 8)
  a, b = _rand(k[2], 16, 4), _rand(k[3], 4, 8)
  y = matmul.lora_dense(x, w, a, b, 2.0)
  assert y.dtype == dtype
  x32 = x.astype(jnp.float32)
  ref = x32 @ w + 2.0 * (x32 @ a) @ b
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=tol, atol=tol * 4)


def test_lora_ragged_dot_equals_per_expert_loop():
  k = jax.random.split(jax.random.PRNGKey(2), 4)
  sizes = jnp.array([3, 0, 5], jnp.int32)
  x, w = _rand(k[0], 8, 6), _rand(k[1], 3, 6, 4)
  a, b = _rand(k[2], 3, 6, 2), _rand(k[3], 3, 2, 4)
  y = matmul.lora_ragged_dot(x, w, sizes, a, b, 0.5)
  expert = np.repeat(np.arange(3), np.asarray(sizes))
  ref = np.stack([x[i] @ w[e] + 0.5 * (x[i] @ a[e]) @ b[e] for i, e in enumerate(expert)])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_lora_term_equals_dense_delta(dtype, tol):
  """The shared term against x @ (s A B) in f64, B non-zero; f32 out for any x dtype."""
  rng = np.random.default_rng(3)
  x, a, b = rng.standard_normal((9, 16)), rng.standard_normal((16, 4)), rng.standard_normal((4, 8))
  y = matmul.lora_term(jnp.asarray(x, dtype), jnp.asarray(a, dtype), jnp.asarray(b, dtype), 0.75)
  assert y.dtype == jnp.float32 and y.shape == (9, 8)
  cast = lambda v: np.asarray(jnp.asarray(v, dtype), np.float64)  # the inputs as rounded
  want = cast(x) @ (0.75 * cast(a) @ cast(b))
  assert np.max(np.abs(want)) > 1.0
  np.testing.assert_allclose(y, want, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("equation, x_shape, a_shape, b_shape", [
    ("...i,io->...o", (2, 3, 6), (6, 2), (2, 5)),      # dense: runs as lora_term
    ("bti,io->bto", (2, 3, 6), (6, 2), (2, 5)),        # dense without an ellipsis
    ("btd,dhk->bthk", (2, 3, 6), (6, 2), (2, 4, 3)),   # several output axes
    ("bthk,hkd->btd", (2, 3, 4, 3), (4, 3, 2), (2, 6)),  # several contracted axes
    ("etd,edf->etf", (3, 4, 6), (3, 6, 2), (3, 2, 5)),  # stacked (per-expert) axis
])
def test_lora_einsum_equals_merged_delta(equation, x_shape, a_shape, b_shape):
  """lora_einsum against einsum(equation, x, s A B) with the delta built by hand."""
  k = jax.random.split(jax.random.PRNGKey(4), 3)
  x, a, b = _rand(k[0], *x_shape), _rand(k[1], *a_shape), _rand(k[2], *b_shape)
  n_stacked = {"etd,edf->etf": 1}.get(equation, 0)
  stack = "e"[:n_stacked]
  a_in = "pqs"[:a.ndim - 1 - n_stacked]
  b_out = "uvw"[:b.ndim - 1 - n_stacked]
  delta = 0.5 * jnp.einsum(f"{stack}{a_in}r,{stack}r{b_out}->{stack}{a_in}{b_out}", a, b)
  want = jnp.einsum(equation, x, delta)
  got = matmul.lora_einsum(equation, x, a, b, 0.5)
  assert np.max(np.abs(want)) > 1.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
