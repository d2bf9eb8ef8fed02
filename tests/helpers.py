"""Shared test helpers."""

import jax
import jax.numpy as jnp


def randomize_b(adapters, key, scale=0.1):
  """Adapters with a random non-zero B (B = 0 at init hides bugs in the LoRA path)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    is_b = getattr(path[-1], "key", None) == "b"
    out.append(scale * jax.random.normal(k, leaf.shape, leaf.dtype) if is_b else leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def max_abs_diff(x, y):
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))
