"""The functional LoRA transform: which kernels get adapters, and the tree surgery.

A LoRA adapter for a kernel ``W`` is a pair ``(A, B)`` with ``W' = W + s * A @ B`` and
``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Adapters never live inside the
parameter tree: ``init_adapters`` returns a separate nested dict that mirrors the paths of
the targeted kernels, with ``{"a": A, "b": B}`` in place of each kernel. That keeps the
frozen base untouched (it can be sharded, quantised or donated on its own terms) and
makes the adapter tree the only thing an optimizer or a checkpoint needs to see.

Kernels of any rank are handled through a *layout*: one character per kernel dimension,
``i`` (contracted input), ``o`` (output), ``b`` (stacked: scanned layers; one adapter per
slice) or ``e`` (MoE experts: one adapter per expert, rank divided by the number of active
experts, FINDINGS 8). ``A`` has the ``b``/``e``/``i`` dims of the kernel then ``r``;
``B`` has the ``b``/``e`` dims, then ``r``, then the ``o`` dims. 2-D kernels default to
``"io"`` (Flax ``[in, out]``); anything else must be declared, or found from the model
with ``jlora.linen_layouts`` / ``jlora.nnx_layouts``, because a shape alone cannot say
which axes a layer contracts.

Paths are "/"-joined keys ("layers_0/mlp/up/kernel"); NNX ``State`` trees work too (the
``Variable.value`` hop is dropped from paths).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.spec import ATTN_NAMES, LAYOUT_ROLES, LORA_A, LORA_B, LoraSpec, MLP_NAMES, PRESETS
from jlora.core.spec import Plan, ROUTER_NAMES, Rule, Target, UNEMBED_NAMES, is_full, plan, resolve
from jlora.core.spec import spec_of
from jlora.core.tree import flatten, path_str, unflatten  # noqa: F401  (re-exported)

PyTree = Any

# ----------------------------------------------------------------------------- transform

def init_adapters(params: PyTree, spec: LoraSpec | Plan, rng: jax.Array) -> dict:
  """Fresh adapters as PEFT initialises them: A ~ U(+-1/sqrt(fan_in)), B = 0.

  Only shapes are read from ``params`` (``jax.ShapeDtypeStruct`` leaves work), so this can
  run under ``jax.jit(..., out_shardings=...)`` to create adapters already sharded. Each
  kernel's key is folded from its path: adding a target does not change the others.
  """
  flat = {}
  dtype = spec_of(spec).dtype
  for path, t in resolve(params, spec).items():
    key = jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    bound = 1.0 / math.sqrt(t.fan_in)
    flat[path] = {
        "a": jax.random.uniform(key, t.a_shape, dtype, -bound, bound),
        "b": jnp.zeros(t.b_shape, dtype),
    }
  return unflatten(flat)


def delta(target: Target, a: jax.Array, b: jax.Array) -> jax.Array:
  """s * A B in the kernel's shape, in f32. Only merge/export use this; training never
  materialises it."""
  ab = jnp.einsum(target.delta_equation(), a.astype(jnp.float32), b.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return target.scale * ab


def adapter_leaves(adapters: PyTree) -> dict[str, dict[str, jax.Array]]:
  """{kernel path: {"a": A, "b": B}} of an adapter tree."""
  flat = flatten(adapters)
  out: dict[str, dict[str, jax.Array]] = {}
  for path, leaf in flat.items():
    kernel_path, _, name = path.rpartition("/")
    if name not in ("a", "b"):
      raise ValueError(f"adapter leaf '{path}' is not an 'a' or 'b' factor")
    out.setdefault(kernel_path, {})[name] = leaf
  return out


def checked_factors(params: PyTree, adapters: PyTree, spec: LoraSpec | Plan
                    ) -> list[tuple[Target, dict[str, jax.Array]]]:
  """(target, {"a", "b"}) for every adapter, checked against the params' kernels."""
  targets = resolve(params, spec)
  out = []
  for path, f in adapter_leaves(adapters).items():
    if path not in targets:
      raise ValueError(f"adapter for '{path}' has no matching target in params")
    t = targets[path]
    if tuple(f["a"].shape) != t.a_shape or tuple(f["b"].shape) != t.b_shape:
      raise ValueError(f"adapter for '{path}' has A{tuple(f['a'].shape)} "
                       f"B{tuple(f['b'].shape)}, expected A{t.a_shape} B{t.b_shape}")
    out.append((t, f))
  return out


def _apply_delta(params, adapters, spec, sign: float):
  factors = {t.path: (t, f) for t, f in checked_factors(params, adapters, spec)}

  def one(keypath, w):
    path = path_str(keypath)
    if path not in factors:
      return w
    t, f = factors[path]
    return (w.astype(jnp.float32) + sign * delta(t, f["a"], f["b"])).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(one, params)


def merge(params: PyTree, adapters: PyTree, spec: LoraSpec | Plan) -> PyTree:
  """W + s A B for every adapted kernel (computed in f32, stored in W's dtype)."""
  return _apply_delta(params, adapters, spec, +1.0)


def unmerge(params: PyTree, adapters: PyTree, spec: LoraSpec | Plan) -> PyTree:
  """Inverse of ``merge``: W - s A B."""
  return _apply_delta(params, adapters, spec, -1.0)


def with_adapters(params: PyTree, adapters: PyTree, spec: LoraSpec | Plan) -> dict:
  """params with each adapter's factors beside its kernel: ``.../lora_a`` = A and
  ``.../lora_b`` = s * B (the scale folded in, so layers need no spec).

  This is how a forward pass sees adapters: jlora's own layers and ``jlora.apply`` read
  ``lora_a``/``lora_b`` from their own scope, so lifted transforms (``nn.scan``) slice
  stacked adapters like the stacked kernel. Differentiable w.r.t. ``adapters``.
  """
  flat = flatten(params)
  for t, f in checked_factors(params, adapters, spec):
    scope, _, leaf = t.path.rpartition("/")
    if leaf != "kernel":
      raise ValueError(f"adapter target '{t.path}' is not a layer kernel")
    flat[f"{scope}/{LORA_A}"] = f["a"]
    flat[f"{scope}/{LORA_B}"] = f["b"] * jnp.asarray(t.scale, f["b"].dtype)
  return unflatten(flat)


def count_params(adapters: PyTree) -> int:
  """Number of scalars in an adapter tree (or any tree)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(adapters))


@dataclasses.dataclass(frozen=True)
class Description:
  """What a spec targets in a parameter tree (``str()`` gives a table)."""
  targets: tuple[Target, ...]
  base_params: int

  @property
  def adapter_params(self) -> int:
    return sum(t.num_params for t in self.targets)

  def __str__(self) -> str:
    width = max([len(t.path) for t in self.targets] + [4])
    lines = [f"{'path':<{width}}  {'shape':<18} layout  rank  scale    params"]
    for t in self.targets:
      lines.append(f"{t.path:<{width}}  {str(t.shape):<18} {t.layout:<6}  {t.rank:>4}  "
                   f"{t.scale:<7.4g}  {t.num_params:,}")
    frac = self.adapter_params / max(self.base_params, 1)
    lines.append(f"{len(self.targets)} kernels, {self.adapter_params:,} LoRA params "
                 f"({frac:.3%} of {self.base_params:,} base params)")
    return "\n".join(lines)


def describe(params: PyTree, spec: LoraSpec | Plan) -> Description:
  """The targeted kernels with their layout, rank, scale and parameter counts."""
  targets = resolve(params, spec)
  return Description(tuple(targets.values()), count_params(params))
