"""Run an unmodified Flax model (linen or NNX) with LoRA adapters on its dense layers.

jlora's own models call ``jlora.core.matmul.lora_dense`` directly. Third-party models do not, so
this module adds the LoRA term around their ``Dense`` / ``DenseGeneral`` / ``Einsum``
layers (NNX: ``Linear`` / ``LinearGeneral`` / ``Einsum``) without materialising W + s A B.
The term is ``jlora.core.matmul.lora_einsum`` of the layer's contraction (for a Dense layer,
``jlora.core.matmul.lora_term`` on flattened activations, as in jlora's own models):

- linen: the factors are placed beside each kernel in the ``params`` collection under the
  reserved names ``lora_a`` / ``lora_b`` (the scale folded into B), and
  ``nn.intercept_methods`` adds ``(x A) B`` to the layer's output. Because the factors are
  ordinary variables of the layer's scope, lifted transforms (``nn.scan``, ``nn.vmap``)
  slice a stacked adapter exactly as they slice the stacked kernel.
- NNX: the state is merged into a fresh module, and each adapted layer is replaced by a
  wrapper in that transient copy (holding A, B and the target's scale); the caller's
  module is never modified.

An adapter that no intercepted layer consumed is an error, so a target that is not one of
these layer types cannot be silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
from flax import linen as nn
from flax import nnx

from jlora.core import lora as lora_lib
from jlora.core.matmul import einsum_layout, lora_einsum

A_NAME, B_NAME = lora_lib.LORA_A, lora_lib.LORA_B
_LETTERS = "abcdefghijklmnopqrstuvwxy"


def _axes(axis, ndim: int) -> tuple[int, ...]:
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axis)


def _general_equation(x_ndim: int, axis, n_features: int) -> str:
  """einsum of DenseGeneral / LinearGeneral (no batch axes): contract ``axis`` of x."""
  contracted = _axes(axis, x_ndim)
  xs = _LETTERS[:x_ndim]
  fs = _LETTERS[x_ndim:x_ndim + n_features]
  ks = "".join(xs[i] for i in contracted) + fs
  out = "".join(c for i, c in enumerate(xs) if i not in contracted) + fs
  return f"{xs},{ks}->{out}"


def _equation(module, x: jax.Array, einsum_str: str | None) -> str | None:
  """The layer's contraction as an einsum, or None if the layer is not one we adapt."""
  if isinstance(module, (nn.Dense, nnx.Linear)):
    return "...i,io->...o"
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"LoRA on DenseGeneral with batch_dims ({module.path}) is not supported")
    features = (module.features,) if isinstance(module.features, int) else module.features
    return _general_equation(x.ndim, module.axis, len(features))
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise ValueError("LoRA on nnx.LinearGeneral with batch_axis is not supported")
    return _general_equation(x.ndim, module.axis, len(module.out_features))
  if isinstance(module, (nn.Einsum, nnx.Einsum)):
    return einsum_str or module.einsum_str
  return None


def _kernel_layout(module) -> str | None:
  """Layout of the module's own (unstacked) kernel, from its configuration."""
  if isinstance(module, (nn.Dense, nnx.Linear)):
    return "io"
  if isinstance(module, nn.DenseGeneral):
    features = (module.features,) if isinstance(module.features, int) else module.features
    n_in = len((module.axis,) if isinstance(module.axis, int) else module.axis)
    return "b" * len(module.batch_dims) + "i" * n_in + "o" * len(features)
  if isinstance(module, nnx.LinearGeneral):
    return "i" * len(module.in_features) + "o" * len(module.out_features)
  if isinstance(module, (nn.Einsum, nnx.Einsum)):
    return einsum_layout(module.einsum_str)
  return None


# ----------------------------------------------------------------------------- linen

def _grafted_scopes(adapters: Any) -> set[str]:
  return {p.rpartition("/")[0] for p in lora_lib.adapter_leaves(adapters)}


def apply(apply_fn: Callable, variables: Any, adapters: Any, spec: lora_lib.LoraSpec,
          *args, **kwargs):
  """Call a linen ``apply_fn`` (e.g. ``model.apply``) with LoRA adapters.

  Args:
    apply_fn: a linen ``Module.apply`` (or a function that calls one).
    variables: the variables it takes, ``{"params": ...}``; the adapters' paths are
      relative to ``variables["params"]``.
    adapters: from ``jlora.init_adapters(variables["params"], spec, rng)``.
    spec: the LoraSpec the adapters were made with.
    *args, **kwargs: passed to ``apply_fn``.
  Returns:
    Whatever ``apply_fn`` returns.
  """
  params = lora_lib.with_adapters(variables["params"], adapters, spec)
  grafted = _grafted_scopes(adapters)
  consumed: set[str] = set()

  def interceptor(next_fun, args_, kwargs_, context):
    module = context.module
    if context.method_name != "__call__" or not module.has_variable("params", A_NAME):
      return next_fun(*args_, **kwargs_)
    x = args_[0] if args_ else kwargs_["inputs"]
    equation = _equation(module, x, kwargs_.get("einsum_str",
                                                args_[1] if len(args_) > 1 else None))
    if equation is None:
      return next_fun(*args_, **kwargs_)
    consumed.add("/".join(module.path))
    a = module.get_variable("params", A_NAME)
    b_scaled = module.get_variable("params", B_NAME)  # with_adapters folded the scale in
    y = next_fun(*args_, **kwargs_)
    return y + lora_einsum(equation, x, a, b_scaled).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    out = apply_fn({**variables, "params": params}, *args, **kwargs)
  missed = grafted - consumed
  if missed:
    raise ValueError(f"adapter at '{sorted(missed)[0]}' was not applied: jlora.apply adapts "
                     "nn.Dense, nn.DenseGeneral and nn.Einsum layers only")
  return out


def linen_layouts(apply_fn: Callable, variables: Any, *args, **kwargs) -> dict[str, str]:
  """Layouts of every Dense/DenseGeneral/Einsum kernel in a linen model, for
  ``LoraSpec.with_layouts``. Traces ``apply_fn`` abstractly (no FLOPs); stacked axes that
  lifted transforms add (``nn.scan``) lead the kernel and become "b"."""
  found: dict[str, str] = {}

  def interceptor(next_fun, args_, kwargs_, context):
    layout = _kernel_layout(context.module)
    if context.method_name == "__call__" and layout is not None:
      found["/".join(context.module.path) + "/kernel"] = layout
    return next_fun(*args_, **kwargs_)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v: apply_fn(v, *args, **kwargs), variables)
  shapes = lora_lib.flatten(variables["params"])
  return {"^" + re.escape(p) + "$": "b" * (len(shapes[p].shape) - len(l)) + l
          for p, l in found.items() if p in shapes}


# ----------------------------------------------------------------------------- nnx

@dataclasses.dataclass
class _NnxLoraLayer:
  """Stands in for one NNX layer inside a transient merged model."""
  base: Any
  a: jax.Array
  b: jax.Array
  scale: float

  def __call__(self, x, *args, **kwargs):
    equation = _equation(self.base, x, kwargs.get("einsum_str",
                                                  args[0] if args else None))
    y = self.base(x, *args, **kwargs)
    return y + lora_einsum(equation, x, self.a, self.b, self.scale).astype(y.dtype)


def _child(node, name: str):
  return node[int(name)] if isinstance(node, (list, tuple, nnx.List)) else getattr(node, name)


def _set_child(node, name: str, value) -> None:
  if isinstance(node, (list, nnx.List)):
    node[int(name)] = value
  else:
    object.__setattr__(node, name, value)


def apply_nnx(graphdef: Any, state: Any, adapters: Any, spec: lora_lib.LoraSpec, *args,
              method: str = "__call__", **kwargs):
  """Call an NNX model given as ``nnx.split`` output with LoRA adapters (pure).

  Args:
    graphdef, state: from ``nnx.split(model)``; adapters are relative to ``state``.
    adapters: from ``jlora.init_adapters(state, spec, rng)``.
    spec: the LoraSpec the adapters were made with.
    method: the model method to call.
  """
  model = nnx.merge(graphdef, state)
  targets = lora_lib.resolve(state, spec)
  for path, f in lora_lib.adapter_leaves(adapters).items():
    if path not in targets:
      raise ValueError(f"adapter for '{path}' has no matching target in state")
    *parents, name, leaf = path.split("/")
    parent = model
    for p in parents:
      parent = _child(parent, p)
    layer = _child(parent, name)
    if leaf != "kernel" or _kernel_layout(layer) is None:
      raise ValueError(f"adapter at '{path}' was not applied: jlora.apply_nnx adapts "
                       "nnx.Linear, nnx.LinearGeneral and nnx.Einsum layers only")
    if "b" in targets[path].layout[:len(targets[path].layout) - len(_kernel_layout(layer))]:
      raise ValueError(f"'{path}' is a stacked NNX kernel; apply_nnx adapts unstacked layers")
    _set_child(parent, name, _NnxLoraLayer(layer, f["a"], f["b"], targets[path].scale))
  return getattr(model, method)(*args, **kwargs)


def nnx_layouts(model: nnx.Module) -> dict[str, str]:
  """Layouts of every Linear/LinearGeneral/Einsum kernel of an NNX model."""
  out = {}
  for path, node in nnx.iter_graph(model):
    layout = _kernel_layout(node) if isinstance(node, nnx.Module) else None
    if layout is not None:
      p = "/".join(map(str, path)) + "/kernel"
      out["^" + re.escape(p) + "$"] = layout
  return out
