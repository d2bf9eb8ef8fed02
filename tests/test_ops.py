"""ops: the LoRA matmuls against their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import ops


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

  got = ops.lora_dense_multi(x, projections, 0.5)
  for g, r in zip(got, reference(x, projections, 0.5)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda p: sum(jnp.sum(jnp.sin(y)) for y in f(x, p, 0.5))
  g1 = jax.grad(loss(ops.lora_dense_multi))(projections)
  g2 = jax.grad(loss(reference))(projections)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_lora_dense_dtypes(dtype, tol):
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  x, w = _rand(k[0], 7, 16).astype(dtype), _rand(k[1], 16, 8)
  a, b = _rand(k[2], 16, 4), _rand(k[3], 4, 8)
  y = ops.lora_dense(x, w, a, b, 2.0)
  assert y.dtype == dtype
  x32 = x.astype(jnp.float32)
  ref = x32 @ w + 2.0 * (x32 @ a) @ b
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=tol, atol=tol * 4)


def test_lora_ragged_dot_equals_per_expert_loop():
  k = jax.random.split(jax.random.PRNGKey(2), 4)
  sizes = jnp.array([3, 0, 5], jnp.int32)
  x, w = _rand(k[0], 8, 6), _rand(k[1], 3, 6, 4)
  a, b = _rand(k[2], 3, 6, 2), _rand(k[3], 3, 2, 4)
  y = ops.lora_ragged_dot(x, w, sizes, a, b, 0.5)
  expert = np.repeat(np.arange(3), np.asarray(sizes))
  ref = np.stack([x[i] @ w[e] + 0.5 * (x[i] @ a[e]) @ b[e] for i, e in enumerate(expert)])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
