"""Where parameters live: one table from logical axes to mesh axes, and the shardings of
parameters, adapters and optimizer state derived from it (the mesh itself and batches on
it: ``jlora.infra.mesh``).

The mesh has axes ("data", "fsdp", "tensor"). Batches are split over data x fsdp; the
frozen base is sharded over "fsdp" on its "embed" axis (FSDP: XLA gathers each layer's
weights where they are used) and over "tensor" on heads / MLP / vocabulary axes. Adapters
follow their kernel (``adapter_specs``: A keeps the kernel's input axes, B its
output axes, the rank axis replicated), and optimizer state follows the adapters
(``state_shardings``). Every sharding decision about parameters is made here; nothing
depends on where the devices are.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.core import lora as lora_lib
from jlora.infra.mesh import BATCH, fit, replicated, shardings_of

RULES = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", None),
    ("layers", None),
    ("head_dim", None),
)


def logical_specs(boxed_params: Any) -> dict[str, P]:
  """{param path: PartitionSpec over mesh axes} from flax's logical-axis metadata."""
  logical = nn.get_partition_spec(boxed_params)
  mesh_specs = nn.logical_to_mesh(logical, RULES)
  flat = {}
  for keypath, spec in jax.tree_util.tree_flatten_with_path(
      mesh_specs, is_leaf=lambda x: isinstance(x, P))[0]:
    flat[lora_lib.path_str(keypath)] = spec if isinstance(spec, P) else P()
  return flat


def param_shardings(specs: dict[str, P], shapes: dict[str, tuple[int, ...]],
                    mesh: Mesh) -> dict[str, NamedSharding]:
  """{path: NamedSharding} for parameters (a mesh axis that does not divide a dim is
  dropped for that dim, e.g. 3 KV heads on a tensor axis of 2)."""
  return {p: NamedSharding(mesh, fit(specs.get(p, P()), shapes[p], mesh)) for p in shapes}


def adapter_specs(plan: lora_lib.Plan, kernel_specs: dict[str, P]) -> dict[str, dict[str, P]]:
  """{kernel path: {"a", "b": PartitionSpec}} derived from each kernel's spec: A keeps the
  kernel's stacked/expert/input axes, B its stacked/expert/output axes, the rank axis is
  replicated (the b/e/i/o layout letters say which axis is which)."""
  out = {}
  for path, t in plan.targets.items():
    spec = tuple(kernel_specs.get(path, P()))
    roles = list(zip(spec + (None,) * (len(t.shape) - len(spec)), t.layout))
    out[path] = {
        "a": P(*(s for s, c in roles if c in "bei"), None),
        "b": P(*(s for s, c in roles if c in "be"), None, *(s for s, c in roles if c == "o")),
    }
  return out


def adapter_shardings(plan: lora_lib.Plan, kernel_specs: dict[str, P], mesh: Mesh) -> dict:
  """Nested {kernel path: {"a", "b": NamedSharding}} mirroring the adapter tree."""
  fitted = {p: fit(kernel_specs.get(p, P()), t.shape, mesh) for p, t in plan.targets.items()}
  flat = {}
  for path, ab in adapter_specs(plan, fitted).items():
    t = plan.targets[path]
    flat[f"{path}/a"] = NamedSharding(mesh, fit(ab["a"], t.a_shape, mesh))
    flat[f"{path}/b"] = NamedSharding(mesh, fit(ab["b"], t.b_shape, mesh))
  return lora_lib.unflatten(flat)


def stacked_adapter_shardings(st, kernel_specs: dict[str, P], mesh: Mesh) -> dict:
  """``adapter_shardings`` for stacked adapters (``jlora.core.stack``): each factor sharded
  as one adapter's, the adapter axis replicated (every device holds every adapter's
  slice of its shard: a group's rows of any adapter may land on any data shard)."""
  from jlora.core import stack
  fitted = {p: fit(kernel_specs.get(p, P()), t.shape, mesh) for p, t in st.targets.items()}
  plan = lora_lib.Plan(st.plans[0].spec, st.targets)
  flat = {}
  for path, ab in adapter_specs(plan, fitted).items():
    t, ax = st.targets[path], stack.adapter_axis(st.targets[path])
    for name, shape in (("a", t.a_shape), ("b", t.b_shape)):
      spec = list(fit(ab[name], shape, mesh)) + [None] * (len(shape) - len(ab[name]))
      spec.insert(ax, None)
      flat[f"{path}/{name}"] = NamedSharding(mesh, P(*spec))
  return lora_lib.unflatten(flat)


def state_shardings(tx: optax.GradientTransformation, trainable: Any, mesh: Mesh) -> dict:
  """Shardings of a training state ``{"step", "trainable", "opt_state"}``: the trainable
  leaves keep theirs, optimizer moments follow the leaf they belong to
  (``optax.tree_map_params``), everything else (step counts) is replicated."""
  everywhere = replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # multi_transform's "no state here"
  opt = optax.tree_map_params(
      tx, lambda leaf, sh: leaf if masked(leaf) else sh, jax.eval_shape(tx.init, trainable),
      shardings_of(trainable), transform_non_params=lambda _: everywhere, is_leaf=masked)
  return {"step": everywhere, "trainable": shardings_of(trainable), "opt_state": opt}


def place_like(tree: Any, like: Any) -> Any:
  """``tree``'s leaves (host arrays) placed with the sharding and dtype of ``like``'s leaf
  at the same path; a leaf that *is* ``like``'s is kept as it is."""
  old = lora_lib.flatten(like)
  return lora_lib.unflatten({
      p: x if x is old[p] else jax.device_put(np.asarray(x, old[p].dtype), old[p].sharding)
      for p, x in lora_lib.flatten(tree).items()})


def place(tree: Any, shardings: dict[str, NamedSharding]) -> dict:
  """Put each leaf of a nested dict on its sharding (paths as in ``lora.flatten``). Every
  process holds the same full values (e.g. loaded from the same checkpoint) and keeps only
  the shards of its own devices."""
  flat = lora_lib.flatten(tree)
  return lora_lib.unflatten({p: _from_host(x, shardings[p]) for p, x in flat.items()})


def _from_host(x, sharding: NamedSharding) -> jax.Array:
  """A host array on ``sharding``: each device gets only its own shard."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.asarray(x)[idx])


def place_leaf(x: Any, spec: P | None, mesh: Mesh) -> Any:
  """One host parameter on ``mesh``, sharded by its kernel's ``spec`` (fitted to its
  shape). A quantised kernel's codes and scales are each sharded like the kernel (an axis
  they cannot split evenly, e.g. int8's one scale row, is replicated)."""
  spec = spec or P()
  return jax.tree.map(lambda a: _from_host(a, NamedSharding(mesh, fit(spec, a.shape, mesh))),
                      x)
