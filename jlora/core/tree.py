"""Parameter paths: "/"-joined keys for any pytree (linen dicts, NNX ``State``), and
flatten/unflatten between nested dicts and ``{path: leaf}``."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

PyTree = Any


def _key_name(k) -> str | None:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return None if k.name == "value" else k.name  # nnx.Variable's value hop
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(keypath) -> str:
  """"/"-joined parameter path of a jax key path."""
  return "/".join(n for n in map(_key_name, keypath) if n is not None)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
      hasattr(x, "shape") and hasattr(x, "dtype"))


def flatten(tree: PyTree) -> dict[str, Any]:
  """{path: leaf} for every leaf (a quantised kernel, ``jlora.core.quant.QTensor``, is one
  leaf); non-array leaves are an error naming the path."""
  from jlora.core import quant
  flat = {}
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
  for keypath, leaf in leaves:
    path = path_str(keypath)
    if not _is_array(leaf):
      raise ValueError(f"parameter '{path}' is a {type(leaf).__name__}, not an array")
    flat[path] = leaf
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of flatten for nested string-keyed dicts."""
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree
